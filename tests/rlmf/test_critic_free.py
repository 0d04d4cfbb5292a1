"""Critic-free RL end to end on a local Ray (the PPO test's prompts, tiny policy and target-token
reward model): GRPO and REINFORCE++-baseline with 4 answers per prompt raise the reward by the
margin the PPO test asserts, with no critic actor, while the adaptive KL controller moves the beta
the policy loss applies; a ``function`` reward drives a run too, its exceptions counted, not
fatal. Pieces of the reward sources, the driver's advantages and dynamic filtering by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from huatuo_ray.config import ModelConfig
from huatuo_ray.inference.generation import SamplingConfig
from huatuo_ray.rlmf import ppo, rewards
from huatuo_ray.rlmf.actors.group import Resources
from huatuo_ray.rlmf.ppo_config import (
    AlgorithmConfig,
    GRPOConfig,
    KLConfig,
    PPOConfig,
    RewardConfig,
    RolloutConfig,
)
from tests.rlmf.test_ppo import ppo_config, ppo_inputs  # noqa: F401 - the module's fixture

SMALL = Resources(workers=1, num_cpus=0.25)


def critic_free(inputs, model: str, out: Path, advantage: str, **overrides) -> PPOConfig:
    fields = dict(
        algorithm=AlgorithmConfig(advantage=advantage),
        sampling=SamplingConfig(n=4, max_new_tokens=16, temperature=1.0, top_p=1.0),
        rollout_size=4,  # 4 prompts x 4 answers: the 16 answers of the PPO test
        # Adaptive: KL stays far below the target, so beta *= 1 - 0.2 x 16 / 160 each iteration.
        kl=KLConfig(init_beta=0.05, placement="loss", estimator="k3", target=1000.0, horizon=160),
        iterations=20,  # as the PPO test
        weight_sync="object_store",
    )
    return ppo_config(inputs, model, out, "hf", **(fields | overrides))


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_reward_rose(records: list[dict], margin: float, key: str = "reward_mean") -> None:
    values = [h[key] for h in records]
    first = sum(values[:3]) / 3
    best = max(sum(values[i : i + 3]) / 3 for i in range(len(values) - 2))
    assert best - first > margin, [round(v, 2) for v in values]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("advantage", "in_process"), [("grpo", False), ("reinforce_pp_baseline", True)]
)
def test_critic_free_estimators_raise_the_reward_without_a_critic(
    ppo_inputs,  # noqa: F811
    tiny_model_dir: str,
    tmp_path: Path,
    local_ray,
    advantage: str,
    in_process: bool,
) -> None:
    """GRPO with each group in its own process; REINFORCE++ with policy (its frozen trunk the
    reference), reward model and engine in one process (``colocate_in_process``), the engine
    taking the weights by a copy in memory: the same learning, and every rollout sampled from
    the policy's current weights (the log-prob gap)."""
    out = tmp_path / advantage
    shared = {"colocate": [["policy", "reward", "rollout"]], "colocate_in_process": True,
              "weight_sync": "auto"} if in_process else {}  # fmt: skip
    manifest = ppo.main(critic_free(ppo_inputs, tiny_model_dir, out, advantage, **shared))
    assert manifest["advantage"] == advantage
    assert "critic" not in manifest["groups"] and "critic" not in manifest["placement"]
    pids = manifest["processes"]
    if in_process:
        assert manifest["weight_sync"] == "in_process"
        assert pids["policy"] == pids["reward"] == pids["rollout"] and len(pids["policy"]) == 1
    else:
        assert len({p for group in pids.values() for p in group}) == 3  # one each
    records = history(out)
    assert len(records) == 20 and all("value_loss" not in h for h in records)
    assert_reward_rose(records, 1.0)  # the PPO test's margin
    assert max(h["rollout_logprob_gap"] for h in records) < 1e-4
    # KL in the loss, not in the reward, with the controller's beta of each iteration: the one
    # logged is the one the policy workers applied, and it moved.
    for i, h in enumerate(records):
        assert h["beta"] == pytest.approx(0.05 * 0.98**i, rel=1e-9)
        assert h["kl_beta"] == pytest.approx(h["beta"], rel=1e-12) and h["kl_loss"] >= 0
    assert manifest["training"]["final_beta"] == pytest.approx(0.05 * 0.98**20, rel=1e-9)


@pytest.mark.slow
def test_function_reward_drives_a_run_and_its_exceptions_are_counted(
    ppo_inputs,  # noqa: F811
    tiny_model_dir: str,
    tmp_path: Path,
    local_ray,
) -> None:
    out = tmp_path / "rule"
    reward = RewardConfig(
        kind="function",
        function="tests.support.rule_rewards:count_target_word",
        fallback=0.0,
        resources=SMALL,
    )
    broken = RewardConfig(
        kind="function",
        function="tests.support.rule_rewards:always_fails",
        fallback=0.0,
        weight=0.5,
        resources=SMALL,
    )
    manifest = ppo.main(
        critic_free(
            ppo_inputs,
            tiny_model_dir,
            out,
            "grpo",
            reward=reward,
            extra_rewards=[broken],
            algorithm=AlgorithmConfig(advantage="grpo", dynamic_filtering=True),
        )
    )
    records = history(out)
    assert manifest["training"]["iterations"] == 20
    # Every answer's call of the broken function was counted, plus the answers with no target.
    assert all(h["reward_errors"] >= 16 for h in records)
    assert "filtered_groups" in records[0]
    assert_reward_rose(records, 0.5)


def test_reward_function_names_and_failures() -> None:
    fn = rewards.load_function("tests.support.rule_rewards:count_target_word")
    assert rewards.call_safely(fn, -1.0, "p", "的的", "", {}) == (2.0, True)
    assert rewards.call_safely(fn, -1.0, "p", "none", "", {}) == (-1.0, False)
    assert rewards.call_safely(lambda *a: float("nan"), 0.5, "p", "r", "", {}) == (0.5, False)
    for bad in ("no_colon", "tests.support.rule_rewards:missing", "no.such.module:f"):
        with pytest.raises(ValueError, match="reward.function"):
            rewards.load_function(bad)


def test_reward_sources_are_summed_by_weight() -> None:
    results = {
        "reward": [(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0]))],
        "reward_1": [
            (torch.tensor([4.0]), torch.tensor([4.0]), 1),
            (torch.tensor([0.0]),) * 2 + (2,),
        ],
    }
    total, raw, errors, spent, turns = rewards.combine(results, {"reward": 1.0, "reward_1": 0.5})
    assert total.tolist() == [3.0, 2.0] and raw.tolist() == [10.0, 20.0] and errors == 3
    assert not spent and turns is None  # no turn-level source
    results["reward_1"][1] = (torch.tensor([0.0]),) * 2 + (0, True)  # a teacher out of budget
    assert rewards.combine(results, {"reward": 1.0, "reward_1": 0.5})[3]
    assert rewards.shard_bounds(5, 2) == [(0, 2), (2, 5)]  # as Experience.shards splits


def test_config_checks_of_critic_free_runs() -> None:
    base = dict(inputs=["x"], output="o", model=ModelConfig(path="m"), rollout_size=4)
    with pytest.raises(ValueError, match="sampling.n >= 2"):
        PPOConfig(**base, algorithm=AlgorithmConfig(advantage="grpo"),
                      minibatch_size=4, micro_batch_size=4, rollout=RolloutConfig(chunk_size=4))  # fmt: skip
    with pytest.raises(ValueError, match="gae samples one"):
        PPOConfig(**base, sampling=SamplingConfig(n=4), minibatch_size=4,
                      micro_batch_size=4, rollout=RolloutConfig(chunk_size=4))  # fmt: skip
    with pytest.raises(ValueError, match="kind function only"):
        PPOConfig(**base, reward=RewardConfig(kind="function"), minibatch_size=4,
                      micro_batch_size=4, rollout=RolloutConfig(chunk_size=4))  # fmt: skip
    with pytest.raises(ValueError, match="pairwise teacher rewards compare the answers"):
        PPOConfig(**base, reward=RewardConfig(kind="teacher"), minibatch_size=4,
                  micro_batch_size=4, rollout=RolloutConfig(chunk_size=4))  # fmt: skip
    ok = PPOConfig(**base, algorithm=AlgorithmConfig(advantage="rloo"),
                       sampling=SamplingConfig(n=4), minibatch_size=8, micro_batch_size=4,
                       rollout=RolloutConfig(chunk_size=8))  # fmt: skip
    assert ok.rows == 16 and not ok.algorithm.uses_critic


def test_kl_in_the_loss_refuses_k1() -> None:
    with pytest.raises(ValueError, match="kl.placement: loss with kl.estimator: k1") as e:
        KLConfig(placement="loss", estimator="k1")
    assert "\n" not in str(e.value) and "kl.estimator: k3" in str(e.value)
    assert KLConfig(placement="reward", estimator="k1").estimator == "k1"  # trlx's PPO
    assert GRPOConfig(inputs=["x"], output="y").kl.estimator == "k3"


def test_driver_takes_group_advantages_and_keeps_kl_out_of_the_reward() -> None:
    from huatuo_ray.rlmf.experience import make_experience

    config = PPOConfig(
        inputs=["x"], output="y", algorithm=AlgorithmConfig(advantage="dr_grpo"),
        sampling=SamplingConfig(n=2), kl=KLConfig(placement="loss", estimator="k2"),
        rollout_size=4, minibatch_size=8, micro_batch_size=4,
        rollout=RolloutConfig(chunk_size=8),
    )  # fmt: skip
    exp = make_experience([[5], [5]], [[7, 8], [7]], [True, True], 0)
    exp.logprobs = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])
    exp.ref_logprobs = torch.tensor([[-1.5, -2.0], [-1.0, 0.0]])
    exp.values = torch.zeros(2, 2)
    exp.scores = torch.tensor([3.0, 1.0])
    ppo.add_rewards_and_advantages(exp, 0.1, config)
    assert exp.kl.tolist() == [[0.125, 0.0], [0.0, 0.0]]  # k2 = 0.5^2 / 2: measured, logged...
    assert exp.rewards.tolist() == [[0.0, 3.0], [1.0, 0.0]]  # ...but not in the reward
    assert exp.advantages.tolist() == [[1.0, 1.0], [-1.0, 0.0]]  # r - group mean (2)


def test_dynamic_filtering_drops_equal_groups_and_refills() -> None:
    from huatuo_ray.rlmf.experience import make_experience
    from huatuo_ray.rlmf.filtering import informative_rollout

    config = PPOConfig(
        inputs=["x"], output="y", algorithm=AlgorithmConfig(advantage="grpo",
        dynamic_filtering=True, max_filter_rounds=3), sampling=SamplingConfig(n=2),
        rollout_size=2, minibatch_size=4, micro_batch_size=4, rollout=RolloutConfig(chunk_size=4),
    )  # fmt: skip
    rollouts = iter([[1.0, 1.0, 0.0, 2.0], [3.0, 3.0, 5.0, 4.0], [9.0, 9.0, 9.0, 9.0]])

    def sample():
        scores = next(rollouts)
        exp = make_experience([[5]] * 4, [[7]] * 4, [True] * 4, 0)
        exp.scores = torch.tensor(scores)
        return exp

    counts: dict = {}
    exp = informative_rollout(config, sample, counts, 0)
    # Round 1 keeps its second group, round 2 its second: enough (2 groups), round 3 not drawn.
    assert exp.scores.tolist() == [0.0, 2.0, 5.0, 4.0] and counts["filtered_groups"] == 2
    rollouts = iter([[1.0, 1.0, 2.0, 2.0]] * 3)
    counts = {}
    exp = informative_rollout(config, sample, counts, 0)
    # Nothing informative in 3 rounds: the batch keeps its size with dropped groups.
    assert exp.scores.tolist() == [1.0, 1.0, 2.0, 2.0] and counts["filtered_groups"] == 6


def test_dynamic_filtering_judges_the_final_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's rollout step with ``reward.unfinished_score``: a group whose answers were all
    cut is uniform after the penalty (dropped), a group the penalty splits is kept."""
    from huatuo_ray.rlmf.experience import make_experience

    config = PPOConfig(
        inputs=["x"], output="y", reward=RewardConfig(unfinished_score=-1.0),
        algorithm=AlgorithmConfig(advantage="grpo", dynamic_filtering=True,
        max_filter_rounds=2), sampling=SamplingConfig(n=2), rollout_size=2, minibatch_size=4,
        micro_batch_size=4, rollout=RolloutConfig(chunk_size=4),
        kl=KLConfig(placement="loss", estimator="k3"),
    )  # fmt: skip
    rollouts = iter(
        [  # (reward-model scores, finished) of two groups of two answers
            ([0.5, 0.5, 0.2, 0.7], [False, True, False, False]),
            ([0.3, 0.3, 1.0, 2.0], [True, True, True, True]),
        ]
    )

    def sample_and_score(config, groups, prompts, pad_id, iteration, times, counts, figures):
        scores, finished = next(rollouts)
        exp = make_experience([[5]] * 4, [[7]] * 4, finished, 0)
        exp.logprobs = exp.ref_logprobs = exp.values = torch.zeros(4, 1)
        exp.scores = exp.raw_scores = torch.tensor(scores)
        times["experience_s"] = times.get("experience_s", 0.0)
        return exp

    monkeypatch.setattr(ppo, "sample_and_score", sample_and_score)
    counts: dict = {}
    exp = ppo.collect_experience(config, {}, None, 0, 0, 0.05, {}, counts)
    # Round 1: (0.5 cut, 0.5) -> (-1, 0.5) kept; (0.2 cut, 0.7 cut) -> (-1, -1) dropped.
    # Round 2: (0.3, 0.3) dropped; (1, 2) kept. Judged on raw scores it would have kept
    # (0.2, 0.7), trained as (-1, -1), and dropped (-1, 0.5).
    assert exp.scores.tolist() == [-1.0, 0.5, 1.0, 2.0] and counts["filtered_groups"] == 2
    a = 1 / math.sqrt(2)  # +-(r - mean) / unbiased std in each kept group
    assert exp.advantages[:, 0].tolist() == pytest.approx([-a, a, -a, a], rel=1e-5)
