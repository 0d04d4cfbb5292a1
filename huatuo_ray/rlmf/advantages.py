"""Advantage estimators without a critic: several answers per prompt (a group) and a baseline from
the group or the batch. Plain tensor math, tested against hand-computed values.

Rows of a rollout are laid out group by group: rows ``g*n .. g*n + n - 1`` are the ``n`` answers
to prompt ``g``. Scores are (B,) sequence rewards; ``mask`` is (B, R), 1 on response tokens.
Every estimator returns (B, R) per-token advantages (0 on padding) that the PPO clipped loss
takes as it takes GAE's:

* ``grpo`` (DeepSeekMath): A_i = (r_i - mean(group)) / (std(group) + eps) on every token of
  answer i; GRPO's loss averages over each answer's tokens, then over answers, so a token of
  answer i weighs A_i / (B x length_i). ``loss_agg: seq_mean_token_mean`` is that form as it
  stands. ``token_mean`` (1 / all tokens) and ``seq_mean_token_sum`` (1 / B) do not divide by
  the answer's length, so there each answer's advantage is scaled by mean_length / length_i
  (the rollout's mean length), which gives GRPO's per-answer weights (times mean_length under
  ``seq_mean_token_sum``; the clipped surrogate is homogeneous in a positive scale of A).
  Scaling under ``seq_mean_token_mean`` too would weigh answer i by 1 / length_i^2;
* ``dr_grpo`` (Liu et al., "GRPO done right"): A_i = r_i - mean(group), neither divided by the
  group's std nor weighted by 1 / length (both bias the update: towards easy or hard prompts,
  and towards long wrong answers);
* ``rloo`` (Ahmadian et al.): A_i = r_i - mean of the other n - 1 answers' rewards;
* ``reinforce_pp`` (REINFORCE++): token rewards -beta KL_t plus the score on the last token,
  returns G_t = sum_{s >= t} gamma^(s-t) r_s, whitened over the batch's tokens;
* ``reinforce_pp_baseline``: the same after subtracting the group's mean score.

A group whose rewards are all equal gives zero advantages under every group estimator; with
``algorithm.dynamic_filtering`` the driver drops such groups (:func:`informative_groups`).
"""

from __future__ import annotations

from typing import Literal

import torch

from huatuo_ray.rlmf.ppo_math import masked_whiten

Estimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
EPS = 1e-6


def grouped(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) -> (B / n, n): one row per prompt."""
    if scores.shape[0] % n:
        raise ValueError(f"{scores.shape[0]} rows do not make groups of {n}")
    return scores.view(-1, n)


def group_normalised(scores: torch.Tensor, n: int, divide_by_std: bool = True) -> torch.Tensor:
    """(B,) r_i - mean(group), divided by the group's (unbiased) std + eps when asked."""
    g = grouped(scores, n)
    centred = g - g.mean(-1, keepdim=True)
    if divide_by_std and n > 1:
        centred = centred / (g.std(-1, keepdim=True) + EPS)
    return centred.reshape(-1)


def leave_one_out(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) r_i - mean_{j != i} r_j = n / (n - 1) x (r_i - mean(group))."""
    if n < 2:
        raise ValueError("RLOO needs at least 2 answers per prompt")
    g = grouped(scores, n)
    others = (g.sum(-1, keepdim=True) - g) / (n - 1)
    return (g - others).reshape(-1)


def per_token(advantage: torch.Tensor, mask: torch.Tensor, length_normalise: bool) -> torch.Tensor:
    """A sequence advantage (B,) on every response token (B, R); with ``length_normalise`` each
    row is scaled by mean_length / its length (GRPO's per-answer mean under a token mean)."""
    mask = mask.float()
    out = advantage[:, None] * mask
    if length_normalise:
        lengths = mask.sum(-1).clamp(min=1)
        out = out * (lengths.mean() / lengths)[:, None]
    return out


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma G_{t'} over each row's action tokens, t' the next one (padding, and a
    gap such as a patient's turn in a consultation, gives and gets nothing: the return passes
    it unchanged)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        acting = mask[:, t] > 0
        running = torch.where(acting, rewards[:, t] + gamma * running, running)
        returns[:, t] = running * mask[:, t]
    return returns


def reinforce_pp(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    gamma: float = 1.0,
    n: int | None = None,
) -> torch.Tensor:
    """REINFORCE++ advantages; with ``n`` the group mean score is subtracted first (-baseline).
    ``kl`` (B, R) enters the token rewards; pass zeros when KL is in the loss instead."""
    from huatuo_ray.rlmf.ppo_math import token_rewards

    mask = mask.float()
    if n is not None:
        scores = group_normalised(scores, n, divide_by_std=False)
    returns = discounted_returns(token_rewards(scores, kl, mask, beta), mask, gamma)
    return masked_whiten(returns, mask)


def critic_free_advantages(
    estimator: str,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    beta: float,
    gamma: float = 1.0,
    loss_agg: str = "token_mean",
) -> torch.Tensor:
    """(B, R) advantages of one of :data:`CRITIC_FREE`. ``kl`` is the per-token KL already
    masked; ``beta`` 0 when KL is in the loss. For the outcome estimators (GRPO, Dr. GRPO,
    RLOO) a KL in the reward is the sequence's summed KL, taken off its score. ``loss_agg``:
    the policy loss's aggregation, which decides whether GRPO scales by length (above)."""
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        group = n if estimator == "reinforce_pp_baseline" else None
        return reinforce_pp(scores, kl, mask, beta, gamma, group)
    scores = scores - beta * (kl * mask).sum(-1)
    if estimator == "grpo":
        by_length = loss_agg != "seq_mean_token_mean"  # that one divides by length itself
        return per_token(group_normalised(scores, n), mask, length_normalise=by_length)
    if estimator == "dr_grpo":
        return per_token(group_normalised(scores, n, divide_by_std=False), mask, False)
    if estimator == "rloo":
        return per_token(leave_one_out(scores, n), mask, length_normalise=False)
    raise ValueError(f"unknown advantage estimator {estimator!r}")


def informative_groups(scores: torch.Tensor, n: int, tolerance: float = 1e-6) -> torch.Tensor:
    """(B / n,) bool: groups whose rewards are not all equal (the others carry no signal)."""
    g = grouped(scores, n)
    return (g.max(-1).values - g.min(-1).values) > tolerance
