"""The losses as the workers compute them, against hand-computed values: aggregation over two
micro-batches on each of two real gloo ranks through ``TrainableWorker.step_totals`` and
``aggregate``; GRPO's per-answer gradient weights under every ``loss_agg``; the clipped value
loss through ``CriticWorker.micro_loss``; the KL term in the policy loss with the driver's beta
through ``PolicyWorker.train``; log-ratio, KL, dual-clip, importance-weight and reward clamps at
their edges; padding that cannot make a loss NaN."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from huatuo_ray.inference.generation import SamplingConfig
from huatuo_ray.rlmf import ppo
from huatuo_ray.rlmf.actors.trainable import TrainableWorker
from huatuo_ray.rlmf.experience import make_experience
from huatuo_ray.rlmf.ppo_config import (
    AlgorithmConfig,
    KLConfig,
    PPOConfig,
    ReferenceConfig,
    RewardConfig,
    RolloutConfig,
    experience_passes,
    old_logprobs_pass,
)
from huatuo_ray.rlmf.ppo_math import (
    aggregate_loss,
    kl_estimate,
    policy_token_losses,
    truncated_is_weights,
)
from huatuo_ray.runtime import free_port

T = torch.tensor
LENGTHS = [1, 3, 2, 4]  # four answers of unequal lengths (width 4)
MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


def with_core(worker: Any, accumulation: int = 1, world: int = 1, rank: int = 0) -> Any:
    """A worker whose DeepSpeed engine is replaced by what ``aggregate`` asks of it."""
    worker.rank, worker.world_size = rank, world
    engine = SimpleNamespace(gradient_accumulation_steps=lambda: accumulation)
    worker.core = SimpleNamespace(engine=engine)
    return worker


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of LENGTHS whose every token's loss is 1, 2, 3, 4; padding holds 99."""
    mask = torch.zeros(4, 4)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None].expand(4, 4).clone()
    losses[mask == 0] = 99.0  # padding must not count
    return losses, mask


# The step's loss of the four rows as one batch, and d loss / d token loss of row i, by hand.
EXPECTED = {
    # (1*1 + 2*3 + 3*2 + 4*4) / 10 tokens; every token weighs 1/10
    "token_mean": (29 / 10, [1 / 10] * 4),
    # rows' token means 1, 2, 3, 4 over 4 rows; a token of row i weighs 1 / (4 L_i)
    "seq_mean_token_mean": (10 / 4, [1 / (4 * n) for n in LENGTHS]),
    # rows' token sums 1, 6, 6, 16 over 4 rows; every token weighs 1/4
    "seq_mean_token_sum": (29 / 4, [1 / 4] * 4),
}


def _rank_of_a_step(rank: int, port: int, mode: str, out: str) -> None:
    """One of two gloo ranks: rows {0, 1} on rank 0, {2, 3} on rank 1, one row per micro-batch
    (minibatch 4 = micro 1 x 2 ranks x accumulation 2). Backward as DeepSpeed does it: the loss
    divided by the accumulation steps, then the gradients averaged over ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    losses, mask = _rows()
    mine = [2 * rank, 2 * rank + 1]
    worker = with_core(TrainableWorker(SimpleNamespace(loss_agg=mode), None), 2, 2, rank)
    minibatch = make_experience([[5]] * 2, [[7] * LENGTHS[i] for i in mine], [True] * 2, 0)
    worker.step_totals(minibatch)  # the real all-reduce of tokens and rows
    weights = losses.clone().requires_grad_(True)
    handed, logged = [], []
    for i in mine:
        share, own = worker.aggregate(weights[[i]], mask[[i]])
        (share / 2).backward()  # DeepSpeed scales by 1 / gradient_accumulation_steps
        handed.append(float(share))
        logged.append(own)
    grad = weights.grad.clone()
    dist.all_reduce(grad)  # DeepSpeed averages gradients over the data-parallel ranks
    parts = torch.tensor(handed)
    dist.all_reduce(parts)
    if rank == 0:
        torch.save(
            {"grad": grad / 2, "handed": parts, "totals": (worker.total_tokens, worker.total_rows),
             "logged": logged},
            out,
        )  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", MODES)
def test_two_micro_batches_on_two_ranks_give_the_one_batch_loss_and_gradient(
    mode: str, tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_of_a_step, args=(free_port(), mode, out), nprocs=2, join=True)
    got = torch.load(out)
    loss, weights = EXPECTED[mode]
    losses, mask = _rows()
    assert got["totals"] == (10.0, 4.0)  # all tokens and rows of the step, on every rank
    # What the worker hands DeepSpeed, divided as DeepSpeed divides it (2 x 2), sums to the loss
    # of the step's rows taken as one batch.
    assert float(got["handed"].sum()) / 4 == pytest.approx(loss)
    expected_grad = torch.tensor(weights)[:, None] * mask  # padding gets no gradient
    assert torch.allclose(got["grad"], expected_grad)
    # The logged figure is the micro-batch's own mean (rows 0 and 1: 1, and 2 or 6).
    assert got["logged"] == pytest.approx([1.0, 2.0 if mode != "seq_mean_token_sum" else 6.0])
    assert float(aggregate_loss(losses, mask, mode)) == pytest.approx(loss)
    with pytest.raises(ValueError):
        aggregate_loss(losses, mask, "token_sum")  # type: ignore[arg-type]


def _grpo_config(**overrides: Any) -> PPOConfig:
    fields = dict(
        inputs=["x"], output="y", algorithm=AlgorithmConfig(advantage="grpo"),
        sampling=SamplingConfig(n=2), rollout_size=2, minibatch_size=4, micro_batch_size=4,
        rollout=RolloutConfig(chunk_size=4), kl=KLConfig(placement="loss", estimator="k3"),
    )  # fmt: skip
    return PPOConfig(**(fields | overrides))


@pytest.mark.parametrize(
    ("mode", "scale"),
    [("token_mean", 1.0), ("seq_mean_token_mean", 1.0), ("seq_mean_token_sum", 2.5)],  # 2.5: mean L
)
def test_grpo_weighs_each_answer_as_grpo_under_every_loss_agg(mode: str, scale: float) -> None:
    """GRPO's loss is -(1/B) sum_i (1/L_i) sum_t A_i ratio_it: a token of answer i weighs
    A_i / (B L_i). The driver's advantages, the workers' loss and aggregation must give that
    weight, up to one factor for the whole batch, under every ``loss_agg`` (scaling by length
    twice under seq_mean_token_mean gave rows 2.5 / L_i times GRPO's: 2.5, 0.83, 1.25, 0.63)."""
    config = _grpo_config(loss_agg=mode)
    exp = make_experience([[5]] * 4, [[7] * n for n in LENGTHS], [True] * 4, 0)
    exp.logprobs = exp.ref_logprobs = exp.values = torch.zeros(4, 4)
    exp.scores = T([1.0, 0.0, 0.0, 2.0])  # groups (1, 0) and (0, 2)
    ppo.add_rewards_and_advantages(exp, 0.1, config)
    # Group-normalised: r - mean over the unbiased std, +-1/sqrt(2) in both groups.
    a = [1 / math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2), 1 / math.sqrt(2)]
    logprobs = exp.logprobs.clone().requires_grad_(True)
    losses, _ = policy_token_losses(logprobs, exp.logprobs, exp.advantages, exp.action_mask, 0.2)
    worker = with_core(TrainableWorker(config, config.policy))
    worker.step_totals(exp)
    loss, _ = worker.aggregate(losses, exp.action_mask)
    loss.backward()
    grpo = torch.tensor([-a[i] / (4 * n) for i, n in enumerate(LENGTHS)])  # per token, by hand
    mask = exp.action_mask.float()
    assert torch.allclose(logprobs.grad, scale * grpo[:, None] * mask, atol=1e-6)
    per_row = logprobs.grad.sum(-1) / (grpo * torch.tensor(LENGTHS, dtype=torch.float))
    assert per_row.tolist() == pytest.approx([scale] * 4, rel=1e-5)  # one factor for all rows


class FixedValues(torch.nn.Module):
    """A value model whose output is a trainable table: V of each position, (1, T)."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.values = torch.nn.Parameter(torch.tensor([values]))

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any) -> torch.Tensor:
        return self.values


def test_clipped_value_loss_wins_and_stops_the_gradient_through_the_critic() -> None:
    from huatuo_ray.rlmf.actors.critic import CriticWorker

    config = PPOConfig(inputs=["x"], output="y", value_clip=0.2)
    critic = with_core(CriticWorker(config, config.critic))
    # Prompt [5], response [7, 8]: V(s_t) of the two response tokens are positions 0 and 1.
    critic.engine = FixedValues([1.0, 0.1, 0.0])
    micro = make_experience([[5]], [[7, 8]], [True], 0)
    micro.values, micro.returns = T([[0.0, 0.0]]), T([[2.0, 0.5]])
    critic.step_totals(micro)
    loss, stats = critic.micro_loss(micro)
    # Token 0: V = 1 moved past old + 0.2; clipped V 0.2: (0.2 - 2)^2 = 3.24 beats (1 - 2)^2 = 1.
    # Token 1: V = 0.1 inside the clip: both (0.1 - 0.5)^2 = 0.16. Loss 0.5 x mean = 0.85.
    assert float(loss.detach()) == pytest.approx(0.5 * (3.24 + 0.16) / 2)
    assert stats["value_loss"] == pytest.approx(0.85)
    assert stats["value_clip_fraction"] == 0.5
    loss.backward()
    # The clipped branch does not depend on V: no gradient on token 0; token 1: (V - R) / 2.
    assert critic.engine.values.grad[0].tolist() == pytest.approx([0.0, -0.2, 0.0])


def test_the_kl_term_in_the_policy_loss_takes_the_drivers_beta(tiny_model_dir: str) -> None:
    """``train(exp, iteration, kl_beta)`` on a real tiny policy: zero advantages, ratio 1 and a
    log-ratio to the reference of 0.3 on every real token leave beta x k3(0.3) as the loss."""
    from transformers import AutoModelForCausalLM

    from huatuo_ray.rlmf.actors.policy import PolicyWorker
    from huatuo_ray.rlmf.model_ops import disable_dropout, forward_logits, token_logprobs

    config = PPOConfig(
        inputs=["x"], output="y", rollout_size=2, minibatch_size=2, micro_batch_size=2,
        rollout=RolloutConfig(chunk_size=2), ppo_epochs=1,
        sampling=SamplingConfig(n=1, temperature=0.7, top_p=1.0),
        kl=KLConfig(init_beta=0.05, placement="loss", estimator="k3"),
    )  # fmt: skip
    policy = with_core(PolicyWorker(config, config.policy))
    handed: list[torch.Tensor] = []
    policy.core.backward_step, policy.core.lr = handed.append, 0.0
    policy.engine = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    disable_dropout(policy.engine)  # as setup does: the ratio of the first step is exactly 1
    exp = make_experience([[0, 50], [0, 60, 70]], [[80, 90, 1], [81]], [True, True], 2)
    with torch.no_grad():
        exp.logprobs = token_logprobs(forward_logits(policy.engine, exp), exp.responses, 0.7)
    exp.ref_logprobs = exp.logprobs - 0.3
    exp.advantages = torch.zeros(2, 3)
    k3 = math.expm1(-0.3) + 0.3
    for beta in (0.05, 0.2):  # init_beta, then what an adaptive controller moved it to
        handed.clear()
        stats = policy.train(exp, 0, beta)
        assert float(handed[0].detach()) == pytest.approx(beta * k3, rel=1e-4)
        assert stats["kl_beta"] == beta and stats["kl_loss"] == pytest.approx(k3, rel=1e-4)


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


def test_padding_cannot_make_the_loss_or_its_gradient_nan() -> None:
    """Both KL clamps off: k3 of a padding token with log-ratio -200 overflows (e^200); the
    masked estimate, the aggregation and the gradient stay finite and ignore it."""
    mask = T([[1.0, 0.0]])
    ref = T([[-1.5, 0.0]])
    assert math.isinf(float(kl_estimate(T([[-1.0, -200.0]]), ref, "k3")[0, 1]))
    logprobs = T([[-1.0, -200.0]]).requires_grad_(True)
    for mode in MODES:
        logprobs.grad = None
        kl = kl_estimate(logprobs, ref, "k3", mask=mask)
        loss = aggregate_loss(kl, mask, mode)
        loss.backward()
        assert float(loss.detach()) == pytest.approx(math.expm1(-0.5) + 0.5)
        # d k3 / d log pi = 1 - e^(-log_ratio); nothing flows to the padding token.
        assert logprobs.grad[0].tolist() == pytest.approx([1 - math.exp(-0.5), 0.0])
        assert float(aggregate_loss(T([[1.0, math.inf]]), mask, mode)) == 1.0


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
    with pytest.raises(ValueError, match="dual_clip must be > 1"):  # refused at load already
        PPOConfig(inputs=["x"], output="y", dual_clip=1.0)
    weights = T([[0.5, 2.0, 1.0, 0.0]])
    weighted, _ = policy_token_losses(new, old, adv, mask, 0.2, 3.0, is_weights=weights)
    assert weighted[0].tolist() == pytest.approx([1.5, 6.0, -0.5, 0.0], rel=1e-5)


def test_truncated_is_weights_cap_and_padding() -> None:
    old = T([[math.log(3.0), math.log(2.0), math.log(0.5), 0.0]])
    engine = T([[0.0, 0.0, 0.0, 0.0]])
    weights = truncated_is_weights(old, engine, T([[1.0, 1.0, 1.0, 0.0]]), cap=2.0)
    assert weights[0].tolist() == pytest.approx([2.0, 2.0, 0.5, 0.0])
    assert not weights.requires_grad


def test_reward_clip_bounds_the_scores() -> None:
    config = PPOConfig(inputs=["x"], output="y", reward=RewardConfig(clip=2.0))
    exp = make_experience([[5], [5], [5]], [[7], [7], [7]], [True] * 3, 0)
    exp.scores = T([-5.0, 2.0, 1.5])
    assert ppo.final_scores(exp, config).scores.tolist() == [-2.0, 2.0, 1.5]


def test_old_logprob_pass_runs_exactly_when_it_is_not_redundant() -> None:
    """Skipped only for one optimizer step per rollout (one epoch, one minibatch of all rows)
    with a separate reference and no KL in the rewards; kept otherwise."""

    def config(**kw: Any) -> PPOConfig:
        fields = dict(
            inputs=["x"], output="y", rollout_size=4, minibatch_size=16, micro_batch_size=8,
            ppo_epochs=1, rollout=RolloutConfig(chunk_size=4),
            reference=ReferenceConfig(mode="separate"),
            sampling=SamplingConfig(n=4), algorithm=AlgorithmConfig(advantage="grpo"),
            kl=KLConfig(init_beta=0.04, placement="loss", estimator="k3"),
        )  # fmt: skip
        return PPOConfig(**(fields | kw))

    assert not old_logprobs_pass(config())
    assert not old_logprobs_pass(config(kl=KLConfig(init_beta=0.0)))  # no KL at all
    assert old_logprobs_pass(config(ppo_epochs=2))
    assert old_logprobs_pass(config(minibatch_size=8))  # two optimizer steps
    assert old_logprobs_pass(config(reference=ReferenceConfig(mode="frozen_trunk")))
    assert old_logprobs_pass(config(kl=KLConfig(init_beta=0.1)))  # KL in the rewards
    assert old_logprobs_pass(config(kl=KLConfig(init_beta=0.0, target=6.0)))
    passes = experience_passes(config())
    assert passes["policy_old_logprobs"] is False and passes["reference_logprobs"] == "reference"
    assert passes["kl_measured_by"] == "policy train pass"


def test_without_the_old_logprob_pass_the_loss_ratio_and_gradient_are_the_same(
    tiny_model_dir: str,
) -> None:
    """One optimizer step on a real tiny policy, with the old log-probs from the no-grad pass
    (``log_probs``) and without them (None: the training forward's own, detached): the ratio is
    1 either way (no clipping, approx_kl 0), the loss is the hand-computed -mean(A) + beta x k3
    and the gradients are equal; the KL and engine gap the driver reads are the same too."""
    from transformers import AutoModelForCausalLM

    from huatuo_ray.rlmf.actors.policy import PolicyWorker
    from huatuo_ray.rlmf.model_ops import disable_dropout

    config = PPOConfig(
        inputs=["x"], output="y", rollout_size=2, minibatch_size=2, micro_batch_size=2,
        rollout=RolloutConfig(chunk_size=2), ppo_epochs=1,
        reference=ReferenceConfig(mode="separate"),
        sampling=SamplingConfig(n=1, temperature=0.7, top_p=1.0),
        kl=KLConfig(init_beta=0.05, placement="loss", estimator="k3"),
    )  # fmt: skip
    assert not old_logprobs_pass(config)
    policy = with_core(PolicyWorker(config, config.policy))
    handed: list[torch.Tensor] = []
    policy.core.backward_step, policy.core.lr = handed.append, 0.0
    policy.engine = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    disable_dropout(policy.engine)
    policy.reference = None  # a separate reference group
    exp = make_experience([[0, 50], [0, 60, 70]], [[80, 90, 1], [81]], [True, True], 2)
    old, _ = policy.log_probs(exp)  # the pass that may be skipped
    exp.ref_logprobs = old - 0.3
    exp.rollout_logprobs = old + 0.01 * exp.action_mask
    exp.advantages = T([[1.0, -2.0, 0.5], [2.0, 0.0, 0.0]])  # row 1 has one token
    k3 = math.expm1(-0.3) + 0.3
    expected = -(1.0 - 2.0 + 0.5 + 2.0) / 4 + 0.05 * k3  # ratio 1: -A per token, token mean
    runs = {}
    for name, logprobs in (("kept", old), ("skipped", None)):
        exp.logprobs = logprobs
        handed.clear()
        policy.engine.zero_grad()
        stats = policy.train(exp, 0, 0.05)
        handed[0].backward()
        grads = [p.grad.clone() for p in policy.engine.parameters() if p.grad is not None]
        runs[name] = (float(handed[0].detach()), stats, grads)
        assert runs[name][0] == pytest.approx(expected, rel=1e-5)
        assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] < 1e-12
    (kept, kept_stats, kept_grads), (skipped, skipped_stats, skipped_grads) = runs.values()
    assert skipped == pytest.approx(kept, rel=1e-6)
    assert len(kept_grads) == len(skipped_grads) > 0
    for a, b in zip(kept_grads, skipped_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # What the driver computes from the pass, the skipped run measures in its training forward.
    assert "sequence_kl" not in kept_stats
    assert skipped_stats["sequence_kl"] == pytest.approx(k3 * 4 / 2, rel=1e-4)  # 4 tokens, 2 rows
    assert skipped_stats["rollout_logprob_gap"] == pytest.approx(0.01, rel=1e-3)
