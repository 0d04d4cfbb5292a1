"""PPO's math on one screen: KL estimates, rewards, GAE, whitening, the clipped losses, KL control.

All tensors are (batch, response_length) over response tokens, with ``mask`` 1 on real tokens and
0 on padding after EOS. Plain functions, tested against hand-computed values; the PPO actors call
them and nothing else computes these quantities.

Conventions follow trlx (which the paper used) and Ziegler et al. (2019):

* per-token reward: ``-beta * KL_t`` on every token, plus the (normalised) reward-model score on
  the last real token;
* advantages by GAE over the masked sequence, whitened over the batch's real tokens;
* policy loss: the PPO clipped surrogate; value loss: the clipped value loss (max of clipped and
  unclipped squared errors), both averaged over real tokens;
* KL controller: fixed, or adaptive (``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
) -> torch.Tensor:
    """(x - mean) / std over real tokens only (population variance); padding stays 0."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's notes).

    With log_ratio = log pi(x) - log pi_ref(x):
    k1 = log_ratio (unbiased, can be negative; trlx's choice);
    k2 = log_ratio^2 / 2 (biased, low variance);
    k3 = (exp(-log_ratio) - 1) + log_ratio, i.e. (q - 1) - log q with q = pi_ref / pi
    (unbiased and never negative).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}")


def token_rewards(
    score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """r_t = -beta * KL_t on real tokens, plus the sequence score on each row's last real token."""
    rewards = -beta * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += score
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over each row; (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last real token is 0);
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V.
    """
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # Padding after EOS must not leak into earlier tokens.
        next_value = values[:, t] * m
        next_advantage = advantage * m
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: mean over real tokens of max(-A * ratio, -A * clip(ratio))."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {
        "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean over real tokens of max((V - R)^2, (V_clipped - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, {"value_clip_fraction": masked_mean((clipped > unclipped).float(), mask)}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution given by ``logits`` (..., vocab)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


@dataclass
class KLController:
    """The KL coefficient beta: fixed (``target`` None) or adaptive (Ziegler et al. / trlx)."""

    beta: float = 0.1  # the paper's initial KL coefficient
    target: float | None = None  # target KL per sequence; None: fixed beta
    horizon: int = 10_000  # samples over which beta moves by the clipped error

    def update(self, current_kl: float, n_samples: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n_samples / self.horizon
        return self.beta
