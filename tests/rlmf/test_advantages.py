"""The critic-free advantage estimators against hand-computed values on small groups."""

from __future__ import annotations

import math

import pytest
import torch

from huatuo_ray.rlmf import advantages as adv

# Two groups of three answers: rewards 1, 2, 3 (mean 2, unbiased std 1) and 5, 5, 5 (no signal);
# the first group's answers are 1, 2 and 3 tokens long, the second's 3 tokens each.
SCORES = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
MASK = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
NO_KL = torch.zeros(6, 3)


def rows(a: torch.Tensor) -> list[list[float]]:
    return [[round(x, 5) for x in row] for row in a.tolist()]


def test_grpo_normalises_by_the_group_and_weights_answers_equally() -> None:
    a = adv.critic_free_advantages("grpo", SCORES, NO_KL, MASK, n=3, beta=0.0)
    # (r - 2) / 1, each row scaled by mean length 2.5 / its length
    assert rows(a[:3]) == [[-2.5, 0, 0], [0, 0, 0], [0.83333] * 3]
    assert a[3:].abs().max() == 0  # equal rewards: no signal
    # The token-mean loss then gives every answer the same total weight |A_i| x 2.5.
    assert float(a[0].sum()) == pytest.approx(-float(a[2].sum()), rel=1e-5)


def test_dr_grpo_neither_divides_by_std_nor_by_length() -> None:
    scores = torch.tensor([1.0, 3.0, 5.0, 5.0, 5.0, 5.0])  # mean 3, std 2
    a = adv.critic_free_advantages("dr_grpo", scores, NO_KL, MASK, n=3, beta=0.0)
    assert rows(a[:3]) == [[-2, 0, 0], [0, 0, 0], [2, 2, 2]]
    grpo = adv.critic_free_advantages("grpo", scores, NO_KL, MASK, n=3, beta=0.0)
    assert rows(grpo[:3]) == [[-2.5, 0, 0], [0, 0, 0], [0.83333] * 3]  # divided by 2, weighted
    assert a[3:].abs().max() == 0


def test_rloo_uses_the_other_answers_as_baseline() -> None:
    a = adv.critic_free_advantages("rloo", SCORES, NO_KL, MASK, n=3, beta=0.0)
    # 1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2
    assert rows(a[:3]) == [[-1.5, 0, 0], [0, 0, 0], [1.5, 1.5, 1.5]]
    assert a[3:].abs().max() == 0
    with pytest.raises(ValueError, match="at least 2"):
        adv.leave_one_out(SCORES, 1)


def test_kl_in_the_reward_of_an_outcome_estimator_is_taken_off_the_score() -> None:
    kl = torch.zeros(6, 3)
    kl[2] = torch.tensor([1.0, 1.0, 2.0])  # answer 3: summed KL 4, x beta 0.5 = 2 -> score 1
    a = adv.critic_free_advantages("dr_grpo", SCORES, kl, MASK, n=3, beta=0.5)
    # scores 1, 2, 1: mean 4/3
    assert rows(a[:3]) == [[-0.33333, 0, 0], [0.66667, 0.66667, 0], [-0.33333] * 3]


def whitened(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [round((v - mean) / std, 4) for v in values]


def test_reinforce_pp_returns_with_token_kl_whitened_over_the_batch() -> None:
    scores = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.2, 0.4], [0.6, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    a = adv.critic_free_advantages("reinforce_pp", scores, kl, mask, n=2, beta=0.5)
    # token rewards: [-0.1, -0.2 + 1], [-0.3 - 1]; returns: [0.7, 0.8], [-1.3]
    expected = whitened([0.7, 0.8, -1.3])
    got = [round(x, 4) for x in (a[0, 0].item(), a[0, 1].item(), a[1, 0].item())]
    assert got == pytest.approx(expected, abs=1e-3)
    assert a[1, 1] == 0
    # -baseline: the group mean (2) comes off the scores 3 and 1 first -> the same as above.
    b = adv.critic_free_advantages(
        "reinforce_pp_baseline", torch.tensor([3.0, 1.0]), kl, mask, n=2, beta=0.5
    )
    assert torch.allclose(a, b, atol=1e-5)
    # Without the baseline, 3 and 1 give other returns: [2.7, 2.8], [0.7].
    c = adv.critic_free_advantages("reinforce_pp", torch.tensor([3.0, 1.0]), kl, mask, 2, 0.5)
    got = [round(x, 4) for x in (c[0, 0].item(), c[0, 1].item(), c[1, 0].item())]
    assert got == pytest.approx(whitened([2.7, 2.8, 0.7]), abs=1e-3)


def test_discounted_returns_stop_at_padding() -> None:
    rewards = torch.tensor([[1.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert adv.discounted_returns(rewards, mask, 0.5).tolist() == [[2.0, 2.0, 0.0]]


def test_groups_of_equal_rewards_are_found() -> None:
    assert adv.informative_groups(SCORES, 3).tolist() == [True, False]
    with pytest.raises(ValueError, match="groups of 4"):
        adv.grouped(SCORES, 4)
