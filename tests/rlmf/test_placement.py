"""A run that cannot hang on its placement: the actor groups' placement groups are checked
against the cluster's nodes before any actor starts (totals, each bundle on some node, strict
strategies), and one that waits past ``placement_timeout_s`` ends the stage with one line.
The check's rules on made-up clusters; the ``grpo`` stage from the command line with every
group at its default resources (1 CPU each, four groups) on ``cluster.num_cpus=2``; a placement
held up by another job's placement group on the tests' local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from huatuo_ray.config import ModelConfig
from huatuo_ray.inputs import UserError
from huatuo_ray.rlmf import ppo
from huatuo_ray.rlmf.actors.group import PlacementRequest, placement_requests, unplaceable
from huatuo_ray.rlmf.actors.group import Resources as R
from huatuo_ray.rlmf.ppo_config import (
    GRPOConfig,
    PolicyConfig,
    ReferenceConfig,
    RewardConfig,
    RolloutConfig,
)

REPO = Path(__file__).resolve().parents[2]
CPU = {"CPU": 1.0}


def test_unplaceable_checks_totals_single_nodes_and_strict_strategies() -> None:
    two = [{"CPU": 2.0, "GPU": 0.0}]
    four = [PlacementRequest([n], [CPU], keys=[f"{n}.resources"]) for n in "abcd"]
    why = unplaceable(four, two)
    assert why is not None and "\n" not in why
    assert "a asks 1 x {CPU 1}" in why and "CPU 4 asked in all, the cluster has 2" in why
    assert "a.resources, b.resources, c.resources, d.resources" in why
    assert "num_cpus 0.5 each for 4 workers on 2 CPUs" in why
    assert unplaceable(four[:2], two) is None  # exactly full: placeable
    # Enough in total, but no node can hold a 3-CPU bundle.
    nodes = [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 2.0, "GPU": 0.0}]
    big = [PlacementRequest(["p"], [{"CPU": 3.0}], keys=["policy.resources"])]
    assert "a bundle of p fits on no node (the largest has CPU 2, GPU 0)" in unplaceable(big, nodes)
    packed = [PlacementRequest(["p"], [{"CPU": 1.5}] * 2, "STRICT_PACK", ["policy.resources"])]
    assert "p (STRICT_PACK) fits on no single node" in unplaceable(packed, nodes)
    assert unplaceable([PlacementRequest(["p"], [{"CPU": 1.5}] * 2, "PACK")], nodes) is None
    spread = [PlacementRequest(["r"], [{"CPU": 0.5}] * 3, "STRICT_SPREAD", ["rollout.resources"])]
    assert "r (STRICT_SPREAD) needs 3 nodes, 2 can host it" in unplaceable(spread, nodes)
    gpus = [PlacementRequest(["r"], [{"CPU": 0.5, "GPU": 1.0}], keys=["rollout.resources"])]
    assert "GPU 1 asked in all, the cluster has 0" in unplaceable(gpus, nodes)


def test_colocated_groups_share_one_request_with_their_cpus_summed() -> None:
    resources = {"policy": R(2, 0.5, 1.0), "reference": R(2, 0.25, 1.0), "rollout": R(1, 1.0)}
    keys = {n: f"{n}.resources" for n in resources}
    requests = placement_requests(resources, [["policy", "reference"]], {"rollout": "SPREAD"}, keys)
    assert [(r.label, r.bundles, r.strategy) for r in requests] == [
        ("policy+reference", [{"CPU": 0.75, "GPU": 1.0}] * 2, "PACK"),
        ("rollout", [{"CPU": 1.0}], "SPREAD"),
    ]
    with pytest.raises(ValueError, match="same number of workers"):
        placement_requests({**resources, "reference": R(1)}, [["policy", "reference"]], {}, keys)


def _inputs(root: Path) -> tuple[str, str]:
    from huatuo_ray import artifacts
    from huatuo_ray.dialogue import Dialogue
    from huatuo_ray.models.tiny import build_tiny_causal_lm

    records = [
        Dialogue(f"q{i}", "t", [{"role": "user", "content": "头痛怎么办"},
                                {"role": "assistant", "content": "多休息"}])
        for i in range(4)
    ]  # fmt: skip
    artifacts.write_all(str(root / "prompts"), records, "test", {})
    return str(root / "prompts"), build_tiny_causal_lm(str(root / "model"))


@pytest.mark.slow
def test_grpo_with_default_resources_on_two_cpus_stops_in_seconds(tmp_path: Path) -> None:
    """The issue's trap: policy, reward (a function), reference and rollout at 1 CPU each on a
    2-CPU Ray used to wait forever; the command line now stops with one line and code 2."""
    prompts, model = _inputs(tmp_path)
    config = {
        "inputs": [prompts],
        "output": str(tmp_path / "out"),
        "model": {"path": model},
        "reward": {"kind": "function", "function": "tests.support.rule_rewards:count_target_word"},
        "policy": {"trainable_layers": None},  # every layer trains: a separate reference group
        "rollout": {"engine": {"backend": "hf"}, "chunk_size": 4},
        "rollout_size": 4,
        "minibatch_size": 16,
        "micro_batch_size": 16,
        "cluster": {"address": "local", "num_cpus": 2},
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "huatuo_ray", "grpo", "--config", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - started
    assert res.returncode == 2, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("grpo: the actor groups can never be placed on this cluster: "), line
    for part in ("policy asks 1 x {CPU 1}", "reward asks 1 x {CPU 1}",
                 "reference asks 1 x {CPU 1}", "rollout asks 1 x {CPU 1}",
                 "CPU 4 asked in all, the cluster has 2", "fix: lower policy.resources",
                 "num_cpus 0.5 each"):  # fmt: skip
        assert part in line, (part, line)
    assert "Traceback" not in res.stderr
    assert took < 60, took  # Ray's start and the tiny model's load; never the 150 s of a hang
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_a_placement_held_up_past_its_timeout_stops_with_one_line(
    tmp_path: Path, tiny_model_dir: str, local_ray
) -> None:
    """Placeable on the cluster (1 CPU asked), but another job holds all but 0.5 CPUs: the
    stage waits ``placement_timeout_s`` and stops, freeing what it asked."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    prompts, _ = _inputs(tmp_path)
    quarter = R(workers=1, num_cpus=0.25)
    config = GRPOConfig(
        inputs=[prompts], output=str(tmp_path / "out"), model=ModelConfig(path=tiny_model_dir),
        reward=RewardConfig(kind="function", resources=quarter,
                                function="tests.support.rule_rewards:count_target_word"),
        policy=PolicyConfig(trainable_layers=None, resources=quarter),
        reference=ReferenceConfig(resources=quarter),
        rollout=RolloutConfig(resources=quarter, chunk_size=4),
        rollout_size=4, minibatch_size=16, micro_batch_size=16, placement_timeout_s=2.0,
    )  # fmt: skip
    other = placement_group([{"CPU": ray.cluster_resources()["CPU"] - 0.5}])
    ray.get(other.ready())
    try:
        started = time.monotonic()
        with pytest.raises(UserError) as caught:
            ppo.main(config)
        took = time.monotonic() - started
    finally:
        remove_placement_group(other)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("placement of ")
    assert "not done after 2 s" in message and "raise placement_timeout_s" in message
    assert took < 30, took
    # Nothing of the stage is left holding the cluster.
    total, deadline = ray.cluster_resources()["CPU"], time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == total


def test_torch_threads_share_the_reserved_cpus_of_a_node_among_a_phase() -> None:
    """The peer benchmark's GRPO on 2 CPUs (four groups of 0.5, taking turns): 2 threads for
    every model group, 1 for the function reward; PPO's groups at 0.25 on the same node: 1
    each; a policy of two workers on two nodes trains beside the critic on one of them only."""
    from huatuo_ray.rlmf.actors.group import torch_threads

    half = {"CPU": 0.5}
    grpo = [PlacementRequest([n], [half]) for n in ("policy", "reward", "reference", "rollout")]
    phases = [{"rollout"}, {"reference"}, {"policy"}]
    got = torch_threads(grpo, [["a"]] * 4, phases, {"a": 2.0})
    assert got == {"policy": [2], "reward": [1], "reference": [2], "rollout": [2]}
    quarter = {"CPU": 0.25}
    names = ("policy", "critic", "reward", "rollout")
    ppo_phases = [{"rollout"}, {"policy", "critic", "reward"}, {"policy", "critic"}]
    got = torch_threads([PlacementRequest([n], [quarter]) for n in names], [["a"]] * 4,
                        ppo_phases, {"a": 2.0})  # fmt: skip
    assert got == {n: [1] for n in names}
    two = [
        PlacementRequest(["policy"], [{"CPU": 2.0}] * 2),
        PlacementRequest(["critic"], [{"CPU": 2.0}]),
        PlacementRequest(["rollout"], [{"CPU": 4.0}]),
    ]
    nodes = [["a", "b"], ["a"], ["b"]]
    got = torch_threads(two, nodes, [{"rollout"}, {"critic"}, {"policy", "critic"}],
                        {"a": 8.0, "b": 8.0})  # fmt: skip
    # Node a: 4 CPUs reserved, policy + critic train together: 2 each; node b: 6 reserved, the
    # policy trains alone there (6), the rollout engine generates alone (6).
    assert got == {"policy": [2, 6], "critic": [2], "rollout": [6]}
    # Critic and reward model in one process (colocate_in_process) score one after the other:
    # one worker of the experience phase beside the reference, 4 CPUs / 2 each (3 groups: 1).
    pair = [PlacementRequest(["critic", "reward"], [{"CPU": 2.0}]),
            PlacementRequest(["reference"], [{"CPU": 2.0}])]  # fmt: skip
    phases = [{"critic", "reference", "reward"}]
    got = torch_threads(pair, [["a"], ["a"]], phases, {"a": 4.0}, [["critic", "reward"]])
    assert got == {"critic": [2], "reward": [2], "reference": [2]}
    assert torch_threads(pair, [["a"], ["a"]], phases, {"a": 4.0}) == {
        "critic": [1], "reward": [1], "reference": [1]}  # fmt: skip
