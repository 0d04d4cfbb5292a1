"""The reward model's loss (PPO's losses and the rest of its math are in :mod:`ppo_math`).

Every function is plain tensor math, tested against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_reward_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin), averaged over pairs.

    ``margin`` (optional, >= 0) asks for a larger gap where the teacher's ratings were further
    apart (Llama-2's margin loss); zero gives the plain Bradley-Terry loss.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose chosen response scores strictly higher."""
    return (chosen > rejected).float().mean()
