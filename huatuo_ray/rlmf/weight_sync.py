"""Weight sync: after each policy update, its trainable weights reach every rollout engine.

Only parameters that train are sent: with the paper's two trainable layers that is a small part
of the model, and the frozen rest is already identical on both sides. Two paths:

* ``broadcast``: one process group spanning policy rank 0 (the root) and every rollout engine
  (each tensor-parallel rank of a vLLM engine joins), NCCL on GPUs and gloo on CPUs. Tensors are
  broadcast one at a time in a fixed order (:class:`ParamSpec`). vLLM loads them with its own
  in-place ``reload_weights``, which knows how to shard
  and fuse it (:class:`VLLMWeightReceiver`, installed as vLLM's ``worker_extension_cls``).
  The rollout side collects the tensors of one update before loading them, so it holds one
  extra copy of the trainable part only.
* ``object_store``: policy rank 0 puts the tensors in Ray's object store once; every rollout
  worker fetches them. Needs no extra ports between nodes.

Under ZeRO-3 every policy rank takes part in gathering each parameter; rank 0 sends it.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParamSpec:
    name: str
    dtype: str  # e.g. "float32"
    shape: tuple[int, ...]


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


def receive(group: Any, specs: list[ParamSpec], device: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """The tensors the root broadcasts, one at a time, in ``specs`` order."""
    for spec in specs:
        tensor = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device=device)
        broadcast(group, tensor)
        yield spec.name, tensor


def copy_into(model: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy tensors into a Hugging Face model's parameters of the same names; returns the count."""
    params = dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, tensor in named:
            if name not in params:
                raise KeyError(f"weight sync: the rollout model has no parameter {name!r}")
            params[name].copy_(tensor.to(params[name].dtype))
            n += 1
    return n


class VLLMWeightReceiver:
    """vLLM worker extension (``LLM(worker_extension_cls=...)``): methods run in every vLLM
    worker through ``llm.collective_rpc``. Names carry a prefix so they never clash with vLLM's."""

    def huatuo_join_sync_group(
        self, addr: str, port: int, rank_offset: int, world: int, backend: str
    ) -> None:
        rank = rank_offset + int(getattr(self, "rank", 0))
        self.huatuo_sync_group = join_group(addr, port, rank, world, backend)

    def _huatuo_reload(self, named: list[tuple[str, torch.Tensor]]) -> int:
        # vLLM repacks some weights after loading (CPU kernels, quantisation); its in-place
        # reload restores the loaders first, so a plain model.load_weights would fail there.
        # It also lists every weight not sent, i.e. the whole frozen trunk, on each update.
        import logging

        logging.getLogger("vllm.model_executor.model_loader.reload.inplace").addFilter(
            lambda record: "were not loaded" not in record.getMessage()
        )
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        return len(named)

    def _huatuo_device(self) -> Any:
        return next(self.model_runner.get_model().parameters()).device

    def huatuo_receive_broadcast(self, specs: list[ParamSpec]) -> int:
        # Received whole before loading: only the trainable part of the model, and the reload
        # then runs once per update.
        return self._huatuo_reload(
            list(receive(self.huatuo_sync_group, specs, self._huatuo_device()))
        )

    def huatuo_load_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        device = self._huatuo_device()
        return self._huatuo_reload([(n, t.to(device)) for n, t in named])
