"""The frozen models: the reference (pi_0, for the KL term) and the reward model (r_RM).

Neither trains, so a group of them is plain data parallelism: the driver hands each worker a
share of the rows. No DeepSpeed engine; weights in the inference dtype.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from huatuo_ray.config import ModelConfig
from huatuo_ray.rlmf.actors.base import ModelWorker, timed
from huatuo_ray.rlmf.experience import Experience, per_length_group
from huatuo_ray.rlmf.model_ops import ValueModel, forward_logits, last_token_scores, token_logprobs
from huatuo_ray.train.core import load_model


class ReferenceWorker(ModelWorker):
    """The frozen SFT model, for full fine-tuning (with top layers only, the policy's frozen
    trunk serves the reference and this group is not created)."""

    def __init__(
        self, model: ModelConfig, temperature: float, pack: bool = False, batch_rows: int = 8
    ):
        self.temperature, self.pack, self.batch_rows = temperature, pack, batch_rows
        self.model = load_model(model, "causal", self.dtype(model))
        self.model.to(self.device).eval().requires_grad_(False)

    @timed
    @torch.no_grad()
    def log_probs(self, exp: Experience) -> torch.Tensor:
        """Log-probs of the sampled tokens, ``batch_rows`` rows of similar lengths at a time."""

        def forward(part: Experience) -> torch.Tensor:
            part = part.to(self.device)
            logits = forward_logits(self.model, part, self.pack)
            return token_logprobs(logits, part.responses, self.temperature).cpu()

        return per_length_group(exp, self.batch_rows, forward)


def reward_normalisation(model_path: str) -> dict[str, float]:
    """The reward model's score mean and std over its training pairs (its manifest). A manifest
    that cannot be read or holds no statistics is an error: 0/1 would silently change beta's
    meaning (set ``reward.normalise: false`` to use raw scores on purpose)."""
    path = os.path.join(model_path, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            stats: dict[str, Any] = json.load(f).get("reward_normalisation") or {}
        mean, std = float(stats["mean"]), float(stats["std"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RuntimeError(
            f"reward normalisation: cannot read mean/std from {path} ({type(e).__name__}: {e}); "
            "the reward-model stage writes them, or set reward.normalise: false"
        ) from e
    return {"mean": mean, "std": std or 1.0}


class RewardWorker(ModelWorker):
    """The frozen reward model: the score at each sequence's last real token, normalised with
    the mean and std the reward-model stage measured, so beta means the same for any RM."""

    def __init__(self, model: ModelConfig, normalise: bool):
        inner = load_model(model, "score", self.dtype(model))
        self.model = ValueModel(inner).to(self.device).eval().requires_grad_(False)
        self.stats = reward_normalisation(model.path) if normalise else {"mean": 0.0, "std": 1.0}

    def normalisation(self) -> dict[str, float]:
        return self.stats

    @timed
    @torch.no_grad()
    def scores(self, exp: Experience, infos: list | None = None) -> tuple[torch.Tensor, ...]:
        """(normalised scores, raw scores), (B,) each; ``infos`` (the prompts' texts, which
        function rewards read) is not needed here."""
        exp = exp.to(self.device)
        values = self.model(exp.sequences, exp.attention_mask, exp.position_ids)
        raw = last_token_scores(values, exp).cpu()
        return (raw - self.stats["mean"]) / self.stats["std"], raw
