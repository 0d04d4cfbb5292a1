"""Loss aggregation over an optimizer step and the clamps, by hand-computed values: unequal
lengths over two micro-batches on each of two ranks sum to the loss of one big batch; log-ratio,
KL, dual-clip, importance-weight and reward clamps at their edges."""

from __future__ import annotations

import math

import pytest
import torch

from huatuo_ray.rlmf.experience import make_experience
from huatuo_ray.rlmf.ppo_math import (
    aggregate_loss,
    kl_estimate,
    policy_token_losses,
    truncated_is_weights,
    value_token_losses,
)

T = torch.tensor


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows of lengths 1, 3, 2, 4 (width 4) whose every token's loss is 1, 2, 3, 4."""
    lengths, values = [1, 3, 2, 4], [1.0, 2.0, 3.0, 4.0]
    mask = torch.zeros(4, 4)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    losses = torch.tensor(values)[:, None].expand(4, 4).clone()
    losses[mask == 0] = 99.0  # padding must not count
    return losses, mask


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # (1*1 + 2*3 + 3*2 + 4*4) / 10 tokens
        ("token_mean", 29 / 10),
        # rows' token means 1, 2, 3, 4 over 4 rows
        ("seq_mean_token_mean", 10 / 4),
        # rows' token sums 1, 6, 6, 16 over 4 rows
        ("seq_mean_token_sum", 29 / 4),
    ],
)
def test_two_micro_batches_on_two_ranks_sum_to_one_big_batch(mode: str, expected: float) -> None:
    losses, mask = _rows()
    big = aggregate_loss(losses, mask, mode)
    assert float(big) == pytest.approx(expected)
    # Rank 0: micro-batches {row 0, row 1} and {row 2}; rank 1: {row 3} and {} (empty is legal).
    ranks = [[[0, 1], [2]], [[3], []]]
    tokens, rows = float(mask.sum()), 4.0  # what the step's all-reduce gives every rank
    parts = [
        aggregate_loss(losses[micro], mask[micro], mode, tokens, rows)
        for rank in ranks
        for micro in rank
    ]
    assert float(sum(parts)) == pytest.approx(expected)
    # DeepSpeed divides by the accumulation steps (2) and averages over ranks (2); the worker
    # hands it share * 2 * 2, so the step's gradient is the big batch's.
    weights = losses.clone().requires_grad_(True)
    sum(
        aggregate_loss(weights[m], mask[m], mode, tokens, rows) * 4 / 4 for r in ranks for m in r
    ).backward()
    reference = losses.clone().requires_grad_(True)
    aggregate_loss(reference, mask, mode).backward()
    assert torch.allclose(weights.grad, reference.grad)


def test_the_mean_of_micro_batch_means_weighs_short_answers_more() -> None:
    """The old aggregation, for contrast: each micro-batch's token mean counted equally."""
    losses, mask = _rows()
    means = [aggregate_loss(losses[[i]], mask[[i]]) for i in range(4)]
    assert float(sum(means) / 4) == pytest.approx(2.5) != pytest.approx(2.9)
    with pytest.raises(ValueError):
        aggregate_loss(losses, mask, "token_sum")  # type: ignore[arg-type]


def test_kl_clamps_at_their_edges() -> None:
    logprobs, ref = T([-30.0, -20.0, 0.0, 9.0]), T([0.0, 0.0, 0.0, 0.0])
    # k3 at log_ratio -30 would be e^30: the log-ratio clamp stops it at -20, the estimate
    # clamp at 10; -20 is inside the first clamp (same value).
    unclamped = kl_estimate(logprobs, ref, "k3")
    assert float(unclamped[0]) == pytest.approx(math.expm1(30) - 30, rel=1e-4)
    bounded = kl_estimate(logprobs, ref, "k3", log_ratio_clamp=20.0)
    assert float(bounded[0]) == float(bounded[1]) == pytest.approx(math.expm1(20) - 20, rel=1e-4)
    clamped = kl_estimate(logprobs, ref, "k3", log_ratio_clamp=20.0, clamp=10.0)
    assert clamped.tolist() == pytest.approx([10.0, 10.0, 0.0, math.expm1(-9) + 9])
    k1 = kl_estimate(logprobs, ref, "k1", log_ratio_clamp=20.0, clamp=10.0)
    assert k1.tolist() == [-10.0, -10.0, 0.0, 9.0]
    assert kl_estimate(T([-10.0]), T([0.0]), "k1", clamp=10.0).tolist() == [-10.0]  # the edge


def test_policy_loss_log_ratio_clamp_and_dual_clip_at_their_edges() -> None:
    old = T([[0.0, 0.0, 0.0, 0.0]])
    new = T([[50.0, math.log(3.0), math.log(0.5), 50.0]])
    adv = T([[-1.0, -1.0, 1.0, 1.0]])
    mask = T([[1.0, 1.0, 1.0, 1.0]])
    losses, stats = policy_token_losses(new, old, adv, mask, clip=0.2)
    # Token 0: ratio e^50 clamped to e^20; A < 0 so the unclipped -A * ratio wins.
    # Token 1: ratio 3, A = -1: max(3, 1.2) = 3. Token 2: ratio 0.5, A = 1: max(-0.5, -0.8).
    # Token 3: ratio e^20, A = 1: max(-e^20, -1.2) = -1.2 (clipped).
    assert losses[0].tolist() == pytest.approx([math.exp(20), 3.0, -0.5, -1.2], rel=1e-5)
    assert float(stats["clip_fraction"]) == pytest.approx(0.25)
    dual, stats = policy_token_losses(new, old, adv, mask, clip=0.2, dual_clip=3.0)
    # Dual-clip caps A < 0 at -A * 3: token 0 drops to 3; token 1 sits on the edge (3 = 3).
    assert dual[0].tolist() == pytest.approx([3.0, 3.0, -0.5, -1.2], rel=1e-5)
    assert float(stats["dual_clip_fraction"]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_token_losses(new, old, adv, mask, clip=0.2, dual_clip=1.0)
    weights = T([[0.5, 2.0, 1.0, 0.0]])
    weighted, _ = policy_token_losses(new, old, adv, mask, 0.2, 3.0, is_weights=weights)
    assert weighted[0].tolist() == pytest.approx([1.5, 6.0, -0.5, 0.0], rel=1e-5)


def test_truncated_is_weights_cap_and_padding() -> None:
    old = T([[math.log(3.0), math.log(2.0), math.log(0.5), 0.0]])
    engine = T([[0.0, 0.0, 0.0, 0.0]])
    weights = truncated_is_weights(old, engine, T([[1.0, 1.0, 1.0, 0.0]]), cap=2.0)
    assert weights[0].tolist() == pytest.approx([2.0, 2.0, 0.5, 0.0])
    assert not weights.requires_grad


def test_value_token_losses_by_hand() -> None:
    values, old, returns = T([[1.0, 0.0]]), T([[0.0, 0.0]]), T([[0.0, 1.0]])
    losses, clipped = value_token_losses(values, old, returns, clip=0.2)
    # Token 0: max(1, 0.2^2) = 1 -> 0.5; token 1: values == old, both 1 -> 0.5.
    assert losses[0].tolist() == pytest.approx([0.5, 0.5])
    assert clipped[0].tolist() == [False, False]


def test_reward_clip_bounds_the_scores() -> None:
    from huatuo_ray.rlmf.ppo import PPOConfig, RewardConfig, add_rewards_and_advantages

    config = PPOConfig(inputs=["x"], output="y", reward=RewardConfig(clip=2.0))
    exp = make_experience([[5], [5], [5]], [[7], [7], [7]], [True] * 3, 0)
    exp.logprobs = exp.ref_logprobs = exp.values = torch.zeros(3, 1)
    exp.scores = T([-5.0, 2.0, 1.5])
    add_rewards_and_advantages(exp, 0.1, config)
    assert exp.scores.tolist() == [-2.0, 2.0, 1.5]
