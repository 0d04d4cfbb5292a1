"""DeepSpeed settings from a stage config: the engine config dict, precision, the LR schedule.

Batch terms, defined once for every training stage:

* ``micro_batch_size``: rows one worker runs forward/backward at a time;
* ``global_batch_size``: rows per optimizer step over all workers;
* gradient accumulation = global / (micro x workers), which must divide exactly.

With packing on, a row holds several samples (up to ``max_length`` tokens), so the paper's
"batch 128" of samples corresponds to fewer, fuller rows; the stage reports samples/s and tokens/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from huatuo_ray.config import option


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine."""

    zero_stage: int = option(2, help="ZeRO stage 0-3")
    offload_optimizer: bool = option(False, help="optimizer states in CPU memory (ZeRO 1-3)")
    offload_params: bool = option(False, help="parameters in CPU memory (ZeRO 3 only)")
    precision: Literal["auto", "bf16", "fp32"] = option(
        "auto", help="auto: bf16 on GPUs, fp32 on CPUs"
    )

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError("zero_stage must be 0, 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1-3")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = option(5e-5, help="peak learning rate (paper SFT: 5e-5)")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    betas: list[float] = option([0.9, 0.95], help="AdamW betas")
    warmup_ratio: float = option(0.03, help="share of the steps spent warming up linearly")
    min_lr_ratio: float = option(0.1, help="the cosine ends at lr x this")
    max_grad_norm: float = option(1.0, help="gradient clipping")


def gradient_accumulation(global_batch: int, micro_batch: int, workers: int) -> int:
    if global_batch % (micro_batch * workers):
        raise ValueError(
            f"global_batch_size {global_batch} is not a multiple of micro_batch_size {micro_batch}"
            f" x {workers} workers"
        )
    return global_batch // (micro_batch * workers)


def use_bf16(config: DeepSpeedConfig, on_gpu: bool) -> bool:
    if config.precision == "auto":
        return on_gpu
    return config.precision == "bf16"


def engine_config(
    config: DeepSpeedConfig, optim: OptimConfig, micro_batch: int, accumulation: int, bf16: bool
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if config.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if config.zero_stage == 3:
        # Lets rank 0 write whole 16-bit weights when saving a Hugging Face folder.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    extra: dict[str, Any] = {}
    if config.offload_optimizer:  # DeepSpeed's CPU Adam works on the offloaded states
        extra["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": optim.betas, "weight_decay": optim.weight_decay},
        }
    return {
        **extra,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": optim.max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the stage logs its own metrics
        "wall_clock_breakdown": False,
    }


def warmup_cosine(step: int, total: int, warmup_ratio: float, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based) of ``total``."""
    warmup = max(1, int(round(total * warmup_ratio))) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: Any, config: DeepSpeedConfig, optim: OptimConfig, on_gpu: bool) -> Any:
    """A torch AdamW over trainable parameters, or None to let DeepSpeed build its CPU Adam
    (needed for optimizer offload; it compiles an op on first use)."""
    if config.offload_optimizer:
        return None
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, fused=on_gpu
    )
