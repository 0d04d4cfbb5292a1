"""Saving and restoring a DeepSpeed training run, and writing a Hugging Face model folder."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from huatuo_ray import storage

TAG = "deepspeed"


def save_state(engine: Any, schedule: Any, folder: str, state: dict[str, Any]) -> None:
    """Every rank writes its shards (a collective call); rank 0 adds the loop state."""
    import torch

    engine.save_checkpoint(folder, tag=TAG)
    if engine.global_rank == 0:
        with open(os.path.join(folder, "state.json"), "w") as f:
            json.dump(state, f)
        torch.save(schedule.state_dict(), os.path.join(folder, "schedule.pt"))


def load_state(engine: Any, schedule: Any, folder: str) -> dict[str, Any]:
    import torch

    path, _ = engine.load_checkpoint(folder, tag=TAG)
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint under {folder}")
    schedule.load_state_dict(torch.load(os.path.join(folder, "schedule.pt"), weights_only=False))
    with open(os.path.join(folder, "state.json")) as f:
        return json.load(f)


def _full_state_dict(engine: Any, zero_stage: int) -> dict[str, Any] | None:
    """The whole model's weights on rank 0 (None elsewhere). ZeRO-3 gathers: all ranks call."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if engine.global_rank == 0 else None


def save_hf_model(engine: Any, tokenizer: Any, uri: str, rank: int, zero_stage: int) -> None:
    """Write ``uri`` as a Hugging Face folder (safetensors, tokenizer with its chat template).

    LoRA adapters are merged into the base weights, so the folder loads in ``transformers`` and
    vLLM like any model. Written to a local temporary folder first, then copied to ``uri``.
    """
    import torch.distributed as dist

    state_dict = _full_state_dict(engine, zero_stage)
    if rank == 0:
        module = engine.module
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
