"""Optional LoRA (peft) for users with less memory: only adapter weights train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from huatuo_ray.config import option


@dataclass
class LoRAConfig:
    """Low-rank adapters instead of full fine-tuning."""

    enabled: bool = option(False, help="train LoRA adapters only (merged into the saved model)")
    r: int = option(16, help="adapter rank")
    alpha: int = option(32, help="adapter scaling")
    dropout: float = option(0.05, help="adapter dropout")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="modules that get adapters",
    )


def apply_lora(model: Any, config: LoRAConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
