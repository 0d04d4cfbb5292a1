"""The one DeepSpeed training core: what every trainer of the project uses, whatever its loss.

The SFT and reward-model loops (on Ray Train, :mod:`~huatuo_ray.train.loop`) and the PPO policy
and critic workers (Ray actors, :mod:`huatuo_ray.rlmf.actors`) all

* join a torch.distributed world (:func:`init_process_group`: NCCL on GPUs, gloo on CPUs);
* load the tokenizer and model the same way (:func:`load_tokenizer`, :func:`load_model`: a URI
  fetched once per node, dtype, ``trust_remote_code``, gradient checkpointing without the KV cache, LoRA, the top-N
  trainable layers);
* train through a :class:`TrainingCore`: the DeepSpeed engine (ZeRO stage, offload, bf16/fp32)
  over the trainable parameters, its warm-up + cosine schedule stepped at each accumulation
  boundary, checkpoints in one format under one tag, and the Hugging Face folder of the weights;
* reduce their statistics over the group with :func:`all_reduce_sum` / :func:`all_reduce_mean`.

A stage supplies only what is its own: how a micro-batch becomes a loss, and how it validates.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Literal

from huatuo_ray import storage
from huatuo_ray.config import ModelConfig
from huatuo_ray.models.fetch import local_model_path
from huatuo_ray.models.kernels import shape_stable_attention
from huatuo_ray.train import deepspeed_setup as ds_setup

TAG = "deepspeed"  # the DeepSpeed checkpoint tag of every trainer
STATE = "state.json"  # the loop's state beside the shards (rank 0)
SCHEDULE = "schedule.pt"


# --------------------------------------------------------------------------- process group


def device_and_backend() -> tuple[Any, bool]:
    """(this worker's device, whether it is a GPU). Ray gives each worker its own GPU(s)."""
    import torch

    on_gpu = torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu"), on_gpu


def init_process_group(
    on_gpu: bool, address: tuple[str, int] | None = None, rank: int = 0, world: int = 1
) -> None:
    """Join the group's torch.distributed world. Ray Train sets the rendezvous in the
    environment (``address`` None); an actor group passes rank 0's ``(host, port)``."""
    import deepspeed

    backend = "nccl" if on_gpu else "gloo"
    if not on_gpu:
        skip_shared_memory_all_reduce()
    if address is None:
        deepspeed.init_distributed(dist_backend=backend)
        return
    host, port = address
    os.environ.update(
        MASTER_ADDR=host,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK="0",  # Ray gives each worker its own GPU(s): device 0 here
    )
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        init_method=f"tcp://{host}:{port}",
        rank=rank,
        world_size=world,
    )


def skip_shared_memory_all_reduce() -> None:
    """On CPUs, DeepSpeed's ``init_distributed`` compiles a shared-memory all-reduce op
    (``deepspeed_shm_comm``: 45-60 s on 2 cores, once per environment) that only its
    tensor-parallel inference layers call (``inference_all_reduce``); training's collectives go
    through gloo either way. Marking the op unavailable skips the build; nothing here uses
    DeepSpeed's tensor-parallel inference."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def all_reduce_sum(values: list[float], device: Any) -> list[float]:
    """Sums of scalars over the world (as is, outside a distributed run)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(values: dict[str, float], device: Any) -> dict[str, float]:
    """Means of named scalars over the world's ranks."""
    import torch.distributed as dist

    if not values:
        return values
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {k: v / world for k, v in zip(values, all_reduce_sum(list(values.values()), device))}


# --------------------------------------------------------------------------- models


def model_dtype(model: ModelConfig, ds: ds_setup.DeepSpeedConfig | None, on_gpu: bool) -> Any:
    """The weights' dtype: the model config's when set, else what the engine trains in."""
    import torch

    if model.dtype != "auto":
        return getattr(torch, model.dtype)
    bf16 = ds_setup.use_bf16(ds, on_gpu) if ds is not None else on_gpu
    return torch.bfloat16 if bf16 else torch.float32


def load_tokenizer(model: ModelConfig) -> tuple[Any, int]:
    """The model's tokenizer and its padding id (the EOS id when it has no pad token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    return tokenizer, pad_id if pad_id is not None else tokenizer.eos_token_id


def load_model(
    model: ModelConfig,
    head: Literal["causal", "score"],
    dtype: Any,
    *,
    pad_id: int | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    lora: Any = None,
) -> Any:
    """A causal LM or a one-output sequence scorer, ready to train: gradient checkpointing (KV
    cache off, it is useless while training) and LoRA adapters. Freezing all but the top layers
    is :func:`freeze_bottom`'s, after this."""
    import transformers

    shape_stable_attention()
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model.trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    path = local_model_path(model.path)  # a URI: fetched once per node
    if head == "causal":
        module = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        module = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, **kwargs
        )
    if pad_id is not None:
        module.config.pad_token_id = pad_id  # the scorer reads the last non-pad token
    if gradient_checkpointing:
        module.gradient_checkpointing_enable()
        module.config.use_cache = False
    if lora is not None and lora.enabled:
        from huatuo_ray.train.lora import apply_lora

        module = apply_lora(module, lora)
    return module


def decoder_layers(model: Any) -> Any:
    """The stack of transformer blocks (``model.model.layers`` in Llama/Qwen; found generically)."""
    from torch import nn

    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found")
    return max(lists, key=len)


def freeze_bottom(
    model: Any, trainable_layers: int | None, trainable_modules: list[str]
) -> list[str]:
    """Freeze all but the top ``trainable_layers`` blocks and ``trainable_modules`` (name
    prefixes); None trains everything. Returns the names of the parameters left trainable."""
    if trainable_layers is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    layers = decoder_layers(model)
    if not 0 <= trainable_layers <= len(layers):
        raise ValueError(f"trainable_layers {trainable_layers}: the model has {len(layers)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - trainable_layers :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    names = dict(model.named_modules())
    for prefix in trainable_modules:
        if prefix not in names:
            raise ValueError(f"trainable_modules: {type(model).__name__} has no module {prefix!r}")
        for p in names[prefix].parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------- the engine


class TrainingCore:
    """One rank's DeepSpeed engine over a module's trainable parameters, with its LR schedule.

    ``core.module(...)`` runs the forward pass; :meth:`backward_step` does the rest of a
    micro-batch and says when an optimizer step (an accumulation boundary) happened.
    """

    def __init__(
        self,
        module: Any,
        ds: ds_setup.DeepSpeedConfig,
        optim: ds_setup.OptimConfig,
        micro_batch: int,
        accumulation: int,
        total_steps: int,
        on_gpu: bool,
    ):
        import deepspeed
        import torch

        self.bf16 = ds_setup.use_bf16(ds, on_gpu)
        self.zero_stage = ds.zero_stage
        self.engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=ds_setup.make_optimizer(module, ds, optim, on_gpu),
            model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=ds_setup.engine_config(ds, optim, micro_batch, accumulation, self.bf16),
        )
        # The schedule drives the optimizer DeepSpeed wraps (ZeRO keeps the torch one inside).
        base_optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            base_optimizer,
            lambda step: ds_setup.warmup_cosine(
                step, total_steps, optim.warmup_ratio, optim.min_lr_ratio
            ),
        )

    @property
    def module(self) -> Any:
        """The engine (call it like the model); ``.module`` of it is the model itself."""
        return self.engine

    @property
    def rank(self) -> int:
        return self.engine.global_rank

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def grad_norm(self) -> float | None:
        return self.engine.get_global_grad_norm()

    def backward_step(self, loss: Any) -> bool:
        """Backward and (at the boundary) optimizer + schedule step; True if a step happened."""
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self.schedule.step()
        return boundary

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, folder: str, state: dict[str, Any] | None = None) -> None:
        """Every rank writes its shards (a collective call); rank 0 adds the schedule and the
        loop's ``state``. Frozen weights are left out: they come back from the model the run
        started from."""
        import torch
        import torch.distributed as dist

        self.engine.save_checkpoint(folder, tag=TAG, exclude_frozen_parameters=True)
        if self.rank == 0:
            torch.save(self.schedule.state_dict(), os.path.join(folder, SCHEDULE))
            world = dist.get_world_size() if dist.is_initialized() else 1
            with open(os.path.join(folder, STATE), "w") as f:
                json.dump({"world_size": world, "state": state or {}}, f)

    def load_checkpoint(self, folder: str) -> dict[str, Any]:
        """Restore shards and schedule; return the loop state saved with them."""
        import torch
        import torch.distributed as dist

        with open(os.path.join(folder, STATE)) as f:
            saved = json.load(f)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if saved["world_size"] != world:
            raise ValueError(
                f"{folder} was written by {saved['world_size']} workers, this run has {world}:"
                " resume with the same number of workers"
            )
        path, _ = self.engine.load_checkpoint(folder, tag=TAG, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {folder}")
        self.schedule.load_state_dict(
            torch.load(os.path.join(folder, SCHEDULE), weights_only=False)
        )
        return saved["state"]

    def save_hf_model(self, tokenizer: Any, uri: str) -> None:
        """Write ``uri`` as a Hugging Face folder (safetensors, tokenizer with its chat
        template). All ranks call it (ZeRO-3 gathers the weights); rank 0 writes. LoRA adapters
        are merged into the base weights, so the folder loads in ``transformers`` and vLLM like
        any model. Written to a local temporary folder first, then copied to ``uri``."""
        import torch.distributed as dist

        if self.zero_stage == 3:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state_dict = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            module = self.engine.module
            if hasattr(module, "merge_and_unload"):  # peft
                import copy

                module = copy.deepcopy(module).cpu().merge_and_unload()
                state_dict = module.state_dict()
            with tempfile.TemporaryDirectory() as tmp:
                module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                storage.upload_dir(tmp, uri)
        if dist.is_initialized():
            dist.barrier()
