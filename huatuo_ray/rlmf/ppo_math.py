"""PPO's math on one screen: KL estimates, rewards, GAE, whitening, the clipped losses, KL control.

All tensors are (batch, response_length) over response tokens, with ``mask`` 1 on real tokens and
0 on padding after EOS. Plain functions, tested against hand-computed values; the PPO actors call
them and nothing else computes these quantities.

Conventions follow trlx (which the paper used) and Ziegler et al. (2019):

* per-token reward: ``-beta * KL_t`` on every token, plus the (normalised) reward-model score on
  the last real token;
* advantages by GAE over the masked sequence, whitened over the batch's real tokens;
* policy loss: the PPO clipped surrogate; value loss: the clipped value loss (max of clipped and
  unclipped squared errors);
* KL controller: fixed, or adaptive (``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``).

As OpenRLHF and veRL compute them (the anchors): per-token losses (:func:`policy_token_losses`,
:func:`value_token_losses`, the ones the workers use) aggregated over all response tokens of an
optimizer step across micro-batches and ranks (:func:`aggregate_loss`), log-ratios clamped before
``exp`` and KL estimates clamped (k3 explodes when the policy drops a token the reference liked),
optional dual-clip, and an optional truncated importance weight for the rollout engine / trainer
mismatch (:func:`truncated_is_weights`). Padding never turns a loss into NaN: its log-ratios are
taken as 0 before any ``exp`` and aggregation selects real tokens instead of multiplying by the
mask (``inf x 0`` is NaN, in the values and in the gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


def real_only(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``values`` on real tokens, 0 on padding, selected (a product with the mask would make
    ``inf x 0 = NaN``); its gradient on padding is 0."""
    if mask is None:
        return values
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return real_only(values, mask).sum() / mask.sum().clamp(min=1)


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
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str = "k1",
    log_ratio_clamp: float | None = None,
    clamp: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's notes).

    With log_ratio = log pi(x) - log pi_ref(x):
    k1 = log_ratio (unbiased, can be negative; trlx's choice);
    k2 = log_ratio^2 / 2 (biased, low variance);
    k3 = (exp(-log_ratio) - 1) + log_ratio, i.e. (q - 1) - log q with q = pi_ref / pi
    (unbiased and never negative).

    ``log_ratio_clamp`` bounds log_ratio to [-c, c] before the estimate (veRL: 20) and ``clamp``
    bounds the estimate to [-c, c] (OpenRLHF and veRL: 10): a token the policy gave up
    (log_ratio -> -inf) would otherwise make k3 ~ exp(|log_ratio|) and swamp the reward.
    With ``mask`` the estimate is 0 on padding whatever the log-probs there (with both clamps
    off, k3 of a padding token could overflow).

    In the loss (GRPO's placement) only k2 and k3 carry a useful gradient: on-policy,
    E[grad k1] = E[grad log pi] = 0, while grad k2 is grad KL(pi || pi_ref) and grad k3 that of
    KL(pi_ref || pi).
    """
    log_ratio = real_only(logprobs - ref_logprobs, mask)
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio**2
    elif kind == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {kind!r}")
    return kl.clamp(-clamp, clamp) if clamp is not None else kl


def token_rewards(
    score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """r_t = -beta * KL_t on the action tokens, plus the sequence score on each row's last one
    (the mask may have gaps: a consultation's patient turns between the doctor's)."""
    rewards = -beta * kl * mask
    # (a row without actions: its last column, which every reader masks)
    last = mask.shape[1] - 1 - (mask.flip(-1) > 0).float().argmax(dim=-1)
    rewards[torch.arange(rewards.shape[0]), last] += score
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over each row's action tokens; (advantages,
    returns).

    delta_t = r_t + gamma * V_{t'} - V_t, with t' the row's next action token (V after the last
    is 0); A_t = delta_t + gamma * lam * A_{t'}; returns = A + V. Tokens outside the mask are
    not steps: trailing padding gives nothing, and a gap (a patient's turn inside a
    consultation) passes the next doctor turn's value and advantage through unchanged.
    """
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        acting = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(acting, advantage, torch.zeros_like(advantage))
        next_value = torch.where(acting, values[:, t], next_value)
        next_advantage = torch.where(acting, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def aggregate_loss(
    losses: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAgg = "token_mean",
    total_tokens: float | None = None,
    total_rows: float | None = None,
) -> torch.Tensor:
    """This micro-batch's part of a loss averaged over a whole optimizer step.

    ``total_tokens`` / ``total_rows``: real response tokens / rows of the step over all its
    micro-batches and ranks (None: this micro-batch alone). The parts of every micro-batch of
    every rank then sum to the loss of the step's rows taken as one batch, whatever their
    lengths (a mean of per-micro-batch token means would weigh short answers more):

    * ``token_mean``: sum of token losses / all tokens (OpenRLHF, veRL's default);
    * ``seq_mean_token_mean``: each row's token mean, averaged over rows;
    * ``seq_mean_token_sum``: each row's token sum, averaged over rows (no length
      normalisation, as in Dr. GRPO's argument).
    """
    masked = real_only(losses, mask)
    mask = mask.to(losses.dtype)
    if mode == "token_mean":
        tokens = total_tokens if total_tokens is not None else mask.sum().clamp(min=1)
        return masked.sum() / tokens
    per_row = masked.sum(-1)
    if mode == "seq_mean_token_mean":
        per_row = per_row / mask.sum(-1).clamp(min=1)
    elif mode != "seq_mean_token_sum":
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return per_row.sum() / (total_rows if total_rows is not None else losses.shape[0])


def policy_token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = 20.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO clipped surrogate, max(-A * ratio, -A * clip(ratio, 1 - e, 1 + e)), (B, R).

    ``log_ratio_clamp``: log(ratio) bounded before ``exp`` (veRL: 20), so one stale token cannot
    overflow. ``dual_clip`` (c > 1, veRL's ``clip_ratio_c``, Ye et al. 2020): for A < 0 the loss
    is at most -A * c, so a huge ratio on a bad token cannot dominate the step.
    ``is_weights``: per-token weights (truncated importance sampling, detached) multiplying it.
    Padding's log-ratio is taken as 0 (ratio 1).
    """
    log_ratio = real_only(logprobs - old_logprobs, mask)
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    losses = torch.max(unclipped, clipped)
    m = mask.float()
    stats = {
        "clip_fraction": masked_mean((clipped > unclipped).float(), m),
        "approx_kl": masked_mean(0.5 * (log_ratio * m) ** 2, m),
    }
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError("dual_clip must be > 1")
        capped = torch.min(losses, -advantages * dual_clip)
        dual = (advantages < 0) & (capped < losses)
        losses = torch.where(advantages < 0, capped, losses)
        stats["dual_clip_fraction"] = masked_mean(dual.float(), m)
    if is_weights is not None:
        losses = losses * is_weights.detach()
    return losses, stats


def value_token_losses(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2), and where the
    clipped term won (for the clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), clipped > unclipped


def truncated_is_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    log_ratio_clamp: float = 20.0,
) -> torch.Tensor:
    """Truncated importance weights min(pi_train / pi_rollout, cap) per token (Yao et al. 2025,
    as OpenRLHF's and veRL's TIS): the engine sampled from its own kernels' distribution, the
    loss assumes the trainer's; the weight corrects for the gap and the cap bounds its variance.
    Padding gets 0; the result carries no gradient."""
    log_ratio = (old_logprobs - rollout_logprobs).clamp(-log_ratio_clamp, log_ratio_clamp)
    return (torch.exp(log_ratio).clamp(max=cap) * mask).detach()


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
