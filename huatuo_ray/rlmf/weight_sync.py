"""Weight sync: after each policy update, its trainable weights reach every rollout engine.

Only parameters that train are sent: with the paper's two trainable layers that is a small part
of the model, and the frozen rest is already identical on both sides. The paths:

* ``broadcast``: one process group spanning policy rank 0 (the root) and every rollout engine
  (each tensor-parallel rank of a vLLM engine joins), NCCL on GPUs and gloo on CPUs. Tensors go
  in a fixed order (:class:`ParamSpec`), packed into flat buckets of at most ``bucket_bytes``
  (one tensor larger than that is a bucket of its own), one broadcast per bucket. The receiving
  side is a generator (:func:`receive_buckets`): it allocates a bucket, receives it, hands out
  its tensors, and drops it before the next, so it never holds more than one bucket
  (:class:`BucketMeter` measures it) and a full fine-tuning update of a 7B model needs no second
  copy of the weights on the engine's GPU. vLLM consumes that stream with its own in-place
  ``reload_weights``, which knows how to shard and fuse each tensor
  (:class:`VLLMWeightReceiver`, installed as vLLM's ``worker_extension_cls``); vLLM buffers the
  tensors of a layer until the layer is complete, so they are handed to it as copies and the
  bucket itself is released (peak: one bucket + one layer).
* ``ipc``: for engines on the policy's own GPUs (``colocate`` with rollout beside policy: the
  hybrid engine), where NCCL cannot help (it refuses two ranks on one GPU). Policy rank i packs
  a bucket and hands its colocated engine i a *handle* to it through Ray (:func:`share`): on a
  GPU a CUDA IPC handle, which the engine opens as a view of the policy's own memory (no copy in
  transit, no collective; OpenRLHF's colocated mode and veRL's hybrid engine do the same), on a
  CPU the bucket itself through Ray's object store (the stand-in the CPU tests run, on the same
  path). The engine copies the bucket's tensors into its weights (vLLM: through the same
  ``reload_weights`` as the broadcast), then the policy frees it and packs the next.
* ``object_store``: policy rank 0 puts the tensors in Ray's object store once; every rollout
  worker fetches them. Needs no extra ports between nodes.

* ``in_process``: for engines in the policy's own process (``colocate_in_process``,
  :mod:`~huatuo_ray.rlmf.actors.shared_process`): each trainable tensor is copied into the
  engine's weights in memory, nothing in transit (:func:`copy_into`).

``auto`` (the default) takes ``in_process`` when rollout and policy share processes, else
``ipc`` when they are colocated, else ``broadcast``
(:func:`resolve_method`). Under ZeRO-3 every policy rank takes part in gathering each parameter;
rank 0 sends it (``ipc``: each rank fills its own engine's bucket).
"""

from __future__ import annotations

import datetime
import logging
import math
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from huatuo_ray.rlmf.ppo_config import resolve_method  # noqa: F401 - here too

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    dtype: str  # e.g. "float32"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


def plan_buckets(specs: list[ParamSpec], bucket_bytes: int) -> list[list[int]]:
    """Consecutive spec indices per bucket: at most ``bucket_bytes`` each and one dtype each (a
    bucket is one flat tensor); a tensor larger than ``bucket_bytes`` travels alone."""
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, spec in enumerate(specs):
        if not buckets or spec.dtype != dtype or size + spec.nbytes > bucket_bytes:
            buckets.append([])
            size, dtype = 0, spec.dtype
        buckets[-1].append(i)
        size += spec.nbytes
    return buckets


@dataclass
class BucketMeter:
    """What a receiver held: buckets alive at once (peak), bytes and tensors received."""

    live: int = 0
    peak: int = 0
    bytes: int = 0
    tensors: int = 0
    _finalizers: list[Any] = field(default_factory=list, repr=False)

    def track(self, bucket: torch.Tensor) -> None:
        self.live += 1
        self.peak = max(self.peak, self.live)
        self.bytes += bucket.numel() * bucket.element_size()
        self._finalizers.append(weakref.finalize(bucket, self._release))

    def _release(self) -> None:
        self.live -= 1

    def wait_released(self, timeout: float = 0.5) -> None:
        """Wait (briefly) until no bucket is alive. The receiver drops its references before
        asking for the next bucket, but the communication backend's thread may still hold the
        finished broadcast's tensor for a moment (gloo does): allocating then would hold two."""
        deadline = time.monotonic() + timeout
        while self.live > 0 and time.monotonic() < deadline:
            time.sleep(0.0005)

    def summary(self) -> dict[str, int]:
        return {"tensors": self.tensors, "bytes": self.bytes, "peak_buckets": self.peak}


def join_group(addr: str, port: int, rank: int, world: int, backend: str) -> Any:
    """A process group of its own (not torch's default group, which the policy's DeepSpeed world
    or vLLM's own world already holds): a TCP store hosted by rank 0, then gloo or NCCL."""
    import torch.distributed as dist

    timeout = datetime.timedelta(minutes=10)
    store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def broadcast(group: Any, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def send_buckets(
    group: Any,
    tensors: Iterable[Any],
    specs: list[ParamSpec],
    bucket_bytes: int,
    device: Any,
    root: bool = True,
) -> int:
    """Broadcast ``tensors`` (in ``specs`` order; each may be a context manager's result, so a
    ZeRO-3 gather happens on every rank) bucket by bucket; returns the bytes sent.
    ``tensors`` yields one item per spec on every rank; only the root packs and sends."""
    sent = 0
    items = iter(tensors)
    for bucket in plan_buckets(specs, bucket_bytes):
        flat = None
        if root:
            dtype = getattr(torch, specs[bucket[0]].dtype)
            flat = torch.empty(sum(specs[i].numel for i in bucket), dtype=dtype, device=device)
        offset = 0
        for i in bucket:
            tensor = next(items)
            if flat is not None:
                flat[offset : offset + specs[i].numel].copy_(tensor.reshape(-1))
            offset += specs[i].numel
        if flat is not None:
            broadcast(group, flat)
            sent += flat.numel() * flat.element_size()
        del flat
    return sent


def receive_buckets(
    group: Any,
    specs: list[ParamSpec],
    bucket_bytes: int,
    device: Any,
    meter: BucketMeter | None = None,
    copy: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each spec as the root's buckets arrive; one bucket alive at a time.

    ``copy=False`` yields views into the bucket: the consumer must drop each before asking for
    the next (as :func:`copy_into` does). ``copy=True`` yields copies, for consumers that keep
    tensors a while (vLLM buffers a layer's weights until the layer is complete).
    """
    meter = meter if meter is not None else BucketMeter()
    for bucket in plan_buckets(specs, bucket_bytes):
        meter.wait_released()
        dtype = getattr(torch, specs[bucket[0]].dtype)
        flat = torch.empty(sum(specs[i].numel for i in bucket), dtype=dtype, device=device)
        meter.track(flat)
        broadcast(group, flat)
        for name, tensor in bucket_tensors(flat, specs, bucket, copy):
            meter.tensors += 1
            yield name, tensor
            del tensor
        del flat  # before the next bucket is allocated


def copy_into(model: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy tensors into a Hugging Face model's parameters of the same names; returns the count.
    Each tensor is dropped once copied, so a streamed source can free its bucket."""
    params = dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, tensor in named:
            if name not in params:
                raise KeyError(f"weight sync: the rollout model has no parameter {name!r}")
            params[name].copy_(tensor.to(params[name].dtype))
            del tensor
            n += 1
    return n


def share(bucket: torch.Tensor) -> tuple[str, Any]:
    """A handle to ``bucket`` for a process beside this one: a CUDA IPC handle on a GPU (the
    receiver maps the same memory; the caller keeps ``bucket`` alive until it is done), else the
    tensor itself (Ray carries it through its object store)."""
    if bucket.is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor

        return "cuda_ipc", reduce_tensor(bucket)
    return "tensor", bucket


def open_shared(handle: tuple[str, Any], device: Any) -> torch.Tensor:
    """The tensor behind a :func:`share` handle, on ``device`` (the receiver's own index of the
    same GPU: each process numbers its visible GPUs from 0)."""
    kind, payload = handle
    if kind == "tensor":
        return payload.to(device)
    rebuild, args = payload
    args = list(args)
    args[6] = torch.device(device).index or 0  # rebuild_cuda_tensor's storage_device
    return rebuild(*args)


def bucket_tensors(
    flat: torch.Tensor, specs: list[ParamSpec], bucket: list[int], copy: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each spec of ``bucket`` laid end to end in ``flat``: views (``copy``:
    copies, for consumers that keep them)."""
    offset = 0
    for i in bucket:
        spec = specs[i]
        view = flat[offset : offset + spec.numel].view(spec.shape)
        offset += spec.numel
        yield spec.name, (view.clone() if copy else view)
        del view


class _PartialReloadFilter(logging.Filter):
    """A partial reload names every frozen layer it did not receive, on every update; those
    lines are expected and drown the log, so they are dropped (other warnings pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "were not loaded" not in message and "Failed to load weights" not in message


def quiet_partial_reload() -> None:
    """Install the filter on vLLM's reload loggers (idempotent)."""
    for name in (
        "vllm.model_executor.model_loader.reload.inplace",
        "vllm.model_executor.model_loader.reload.layerwise",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PartialReloadFilter) for f in logger.filters):
            logger.addFilter(_PartialReloadFilter())


class VLLMWeightReceiver:
    """vLLM worker extension (``LLM(worker_extension_cls=...)``): methods run in every vLLM
    worker through ``llm.collective_rpc``. Names carry a prefix so they never clash with vLLM's."""

    def huatuo_join_sync_group(
        self, addr: str, port: int, rank_offset: int, world: int, backend: str
    ) -> None:
        rank = rank_offset + int(getattr(self, "rank", 0))
        self.huatuo_sync_group = join_group(addr, port, rank, world, backend)

    def _huatuo_reload(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        # vLLM repacks some weights after loading (CPU kernels, quantisation); its in-place
        # reload restores the loaders first, so a plain model.load_weights would fail there.
        # It consumes ``named`` lazily (model.load_weights iterates it).
        quiet_partial_reload()
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)

    def _huatuo_device(self) -> Any:
        return next(self.model_runner.get_model().parameters()).device

    def huatuo_receive_broadcast(self, specs: list[ParamSpec], bucket_bytes: int) -> dict:
        """Stream the root's buckets into vLLM's reload: no list of the update is built."""
        meter = BucketMeter()
        device = self._huatuo_device()
        self._huatuo_reload(
            receive_buckets(self.huatuo_sync_group, specs, bucket_bytes, device, meter, copy=True)
        )
        return meter.summary()

    def huatuo_receive_shared(
        self, handle: tuple[str, Any], specs: list[ParamSpec], bucket: list[int]
    ) -> dict:
        """One bucket by :func:`share` handle (the policy on this GPU holds it meanwhile)."""
        flat = open_shared(handle, self._huatuo_device())
        self._huatuo_reload(bucket_tensors(flat, specs, bucket, copy=True))
        nbytes = flat.numel() * flat.element_size()
        del flat
        return {"tensors": len(bucket), "bytes": nbytes, "peak_buckets": 1}

    def huatuo_load_weights(self, named: list[tuple[str, torch.Tensor]]) -> dict:
        device = self._huatuo_device()
        self._huatuo_reload((n, t.to(device)) for n, t in named)
        return {
            "tensors": len(named),
            "bytes": sum(t.numel() * t.element_size() for _, t in named),
            "peak_buckets": 1,
        }


class WeightSync:
    """The driver's side: policy -> rollout engines, by broadcast group or object store, for
    the PPO config ``config``; ``push()`` returns seconds."""

    def __init__(self, config: Any, groups: dict[str, Any]):
        import ray

        on_gpu = config.rollout.resources.num_gpus > 0 and config.policy.resources.num_gpus > 0
        self.method = resolve_method(
            config.weight_sync, config.colocate, on_gpu, config.colocate_in_process
        )
        self.bucket_bytes = int(config.sync_bucket_mb * 2**20)
        self.last: dict[str, float] = {}
        self.policy, self.rollout = groups["policy"], groups["rollout"]
        if self.method in ("object_store", "in_process"):
            return
        self.specs = ray.get(self.policy.workers[0].weight_specs.remote())
        if self.method == "ipc":
            return
        ranks = ray.get(self.rollout.call("engine_ranks"))  # TP ranks of each engine (HF: 1)
        offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        world = 1 + sum(ranks)
        addr, port = ray.get(self.policy.workers[0].address.remote())
        backend = "nccl" if on_gpu else "gloo"
        ray.get(
            self.policy.call("join_sync_group", addr, port, world, backend)
            + [
                w.join_sync_group.remote(addr, port, offset, world, backend)
                for offset, w in zip(offsets, self.rollout.workers)
            ]
        )

    def push(self) -> float:
        """One update to every engine; seconds. ``last`` keeps the engines' figures (bytes,
        tensors, buckets held at once), logged with the time."""
        import ray

        started = time.perf_counter()
        if self.method == "broadcast":
            results = ray.get(
                self.policy.call("broadcast_weights", self.bucket_bytes)
                + self.rollout.call("receive_broadcast", self.specs, self.bucket_bytes)
            )[len(self.policy) :]
        elif self.method == "ipc":
            results = self._hand_over()
        elif self.method == "in_process":
            from huatuo_ray.rlmf.actors.shared_process import process_of

            results = ray.get([process_of(w).copy_weights.remote() for w in self.rollout.workers])
        else:
            refs = [r for rs in ray.get(self.policy.call("weights_to_object_store")) for r in rs]
            results = ray.get(self.rollout.call("load_weights", refs[0]))
        seconds = time.perf_counter() - started
        self.last = {
            "sync_mb": sum(r["bytes"] for r in results) / len(results) / 2**20,
            "sync_peak_buckets": max(r["peak_buckets"] for r in results),
        }
        log.info(
            "ppo: weight sync %.1f MB x %d engines in %.3f s (%s)",
            self.last["sync_mb"], len(results), seconds, self.method,
        )  # fmt: skip
        return seconds

    def _hand_over(self) -> list[dict]:
        """The ``ipc`` path: bucket by bucket, every policy rank packs its bucket and its
        colocated engine copies it in; the policy frees it once every engine is done."""
        import ray

        totals = [{"tensors": 0, "bytes": 0, "peak_buckets": 1} for _ in self.rollout.workers]
        for bucket in plan_buckets(self.specs, self.bucket_bytes):
            handles = ray.get(self.policy.call("share_bucket", bucket, self.bucket_bytes))
            received = ray.get(
                [
                    engine.receive_shared.remote(handle, self.specs, bucket)
                    for engine, handle in zip(self.rollout.workers, handles)
                ]
            )
            ray.get(self.policy.call("release_bucket"))
            for total, got in zip(totals, received):
                total["tensors"] += got["tensors"]
                total["bytes"] += got["bytes"]
        return totals
