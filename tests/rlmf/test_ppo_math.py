"""PPO's math against hand-computed values: GAE, the clipped policy loss the workers use at the clip
edges, KL estimators, masked whitening, token rewards, and the adaptive KL controller (the
aggregation, clamps and value loss: ``test_ppo_losses``)."""

from __future__ import annotations

import math

import pytest
import torch

from huatuo_ray.rlmf.ppo_math import (
    KLController,
    aggregate_loss,
    entropy_from_logits,
    gae,
    kl_estimate,
    masked_whiten,
    policy_token_losses,
    token_rewards,
)

T = torch.tensor


def test_gae_by_hand() -> None:
    rewards, values, mask = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), T([[1.0, 1.0, 1.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # t2: 1 - 0.5 = 0.5; t1: 0.9*0.5 - 0.5 + 0.855*0.5 = 0.3775; t0: -0.05 + 0.855*0.3775
    assert adv[0].tolist() == pytest.approx([-0.05 + 0.855 * 0.3775, 0.3775, 0.5])


def test_gae_ignores_padding_after_eos() -> None:
    short, _ = gae(T([[0.0, 1.0]]), T([[0.5, 0.5]]), T([[1.0, 1.0]]), 0.9, 0.95)
    padded, ret = gae(T([[0.0, 1.0, 7.0]]), T([[0.5, 0.5, 3.0]]), T([[1.0, 1.0, 0.0]]), 0.9, 0.95)
    assert padded[0, :2].tolist() == pytest.approx(short[0].tolist())
    assert padded[0, 2] == 0 and ret[0, 2] == 0


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "clipped"),
    [
        (1.3, 1.0, -1.2, 1.0),  # above the edge, positive advantage: the clip binds
        (1.3, -1.0, 1.3, 0.0),  # above the edge, negative advantage: pessimism keeps 1.3
        (0.7, 1.0, -0.7, 0.0),
        (0.7, -1.0, 0.8, 1.0),  # below the edge, negative advantage: the clip binds
        (1.1, 1.0, -1.1, 0.0),  # inside the range
    ],
)
def test_policy_loss_at_the_clip_edges(
    ratio: float, advantage: float, loss: float, clipped: float
) -> None:
    old = T([[0.0]])
    new = T([[math.log(ratio)]])
    losses, stats = policy_token_losses(new, old, T([[advantage]]), T([[1.0]]), clip=0.2)
    assert float(aggregate_loss(losses, T([[1.0]]))) == pytest.approx(loss, rel=1e-5)
    assert float(stats["clip_fraction"]) == clipped
    assert float(stats["approx_kl"]) == pytest.approx(0.5 * math.log(ratio) ** 2, rel=1e-5)


def test_policy_loss_averages_real_tokens_only() -> None:
    mask = T([[1.0, 0.0]])
    # Padding: an advantage of 100 and a log-ratio of 50 (ratio e^50) count for nothing.
    losses, stats = policy_token_losses(T([[0.0, 50.0]]), T([[0.0, 0.0]]), T([[1.0, 100.0]]),
                                        mask, 0.2)  # fmt: skip
    assert float(aggregate_loss(losses, mask)) == pytest.approx(-1.0)
    assert float(stats["clip_fraction"]) == 0.0 and float(stats["approx_kl"]) == 0.0


def test_kl_estimators() -> None:
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    log_ratio = math.log(2.0)
    assert float(kl_estimate(logp, ref, "k1")) == pytest.approx(log_ratio)
    assert float(kl_estimate(logp, ref, "k2")) == pytest.approx(0.5 * log_ratio**2)
    assert float(kl_estimate(logp, ref, "k3")) == pytest.approx(0.5 - 1 + log_ratio)  # r = 0.5
    assert float(kl_estimate(ref, ref, "k3")) == 0.0
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k9")


def test_masked_whiten() -> None:
    out = masked_whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]]))
    s = math.sqrt(2 / 3)
    assert out[0].tolist() == pytest.approx([-1 / s, 0.0, 1 / s, 0.0], abs=1e-4)


def test_token_rewards() -> None:
    rewards = token_rewards(
        T([2.0]), T([[0.1, 0.2, 0.3, 9.0]]), T([[1.0, 1.0, 1.0, 0.0]]), beta=0.5
    )
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1, -0.15 + 2.0, 0.0])


def test_adaptive_kl_controller() -> None:
    controller = KLController(beta=0.1, target=6.0, horizon=10_000)
    assert controller.update(12.0, 64) == pytest.approx(
        0.1 * (1 + 0.2 * 64 / 10_000)
    )  # clipped +0.2
    controller = KLController(beta=0.1, target=6.0, horizon=10_000)
    assert controller.update(5.0, 64) == pytest.approx(0.1 * (1 - (1 / 6) * 64 / 10_000))
    fixed = KLController(beta=0.1)
    assert fixed.update(100.0, 64) == 0.1


def test_entropy_of_uniform() -> None:
    assert float(entropy_from_logits(torch.zeros(4))) == pytest.approx(math.log(4))
