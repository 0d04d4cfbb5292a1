"""Stage ``tiny-model``: a tiny random model with a tokenizer trained on the spot.

Nothing can be downloaded in tests or the demo, so they build their models here: a Llama-style
causal LM (``kind=causal_lm``) or a one-output sequence-scoring model (``kind=reward``), saved as
a normal Hugging Face folder with the project's chat template and a manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from huatuo_ray.config import option


@dataclass
class TinyModelConfig:
    """Build a tiny model artifact."""

    output: str = option(help="folder to write the model to")
    kind: Literal["causal_lm", "reward"] = option("causal_lm", help="which head")
    tokenizer_from: str | None = option(
        None, help="reuse the tokenizer of this model folder (a reward model must match its policy)"
    )
    hidden_size: int = option(64, help="hidden size")
    num_layers: int = option(2, help="transformer layers")
    num_heads: int = option(2, help="attention heads (head_dim = hidden/heads must be >= 32)")
    seed: int = option(0, help="seed of the random weights")


def main(config: TinyModelConfig) -> str:
    from huatuo_ray.models.tiny import TinyConfig, build_tiny_causal_lm, build_tiny_reward_model

    tiny = TinyConfig(
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        seed=config.seed,
    )
    if config.kind == "reward":
        return build_tiny_reward_model(config.output, tiny, tokenizer_dir=config.tokenizer_from)
    return build_tiny_causal_lm(config.output, tiny)
