"""The ppo stage end to end on a local Ray: tiny policy, a hand-built reward model that prefers
one token, real prompts from ../shared/datasets. The reward rises while KL stays bounded, with
HF-generate and with vLLM-CPU rollout workers; the rollout engines hold the policy's weights
after every sync; a killed job resumes from its checkpoint and redraws what it would have drawn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from huatuo_ray.config import ClusterConfig, ModelConfig
from huatuo_ray.data.convert import DataConfig, convert
from huatuo_ray.inference.generation import EngineConfig, SamplingConfig
from huatuo_ray.rlmf import ppo
from huatuo_ray.rlmf.actors.group import Resources
from huatuo_ray.rlmf.ppo_config import (
    CheckpointEvery,
    CriticConfig,
    KLConfig,
    PolicyConfig,
    PPOConfig,
    RewardConfig,
    RolloutConfig,
)
from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig
from tests.conftest import ClusterHead
from tests.ray_head import MetricsScraper
from tests.support.crash import kill_when

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TARGET_TOKEN = 100


@pytest.fixture(scope="module")
def ppo_inputs(
    tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path, tiny_model_dir: str
):
    """(RL prompt artifact from real consultations, the target-token reward model)."""
    from tests.support.target_reward import build_target_token_reward_model

    root = tmp_path_factory.mktemp("ppo")
    convert(
        DataConfig(
            source="cmd_csv",
            input=str(
                shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
            ),
            output=str(root / "prompts"),
            limit=40,
        )
    )
    reward = build_target_token_reward_model(str(root / "reward"), tiny_model_dir, TARGET_TOKEN)
    return str(root / "prompts"), reward


def ppo_config(inputs, model: str, out: Path, backend: str, **overrides) -> PPOConfig:
    prompts, reward = inputs
    small = Resources(workers=1, num_cpus=0.25)
    fields = dict(
        inputs=[prompts],
        output=str(out),
        model=ModelConfig(path=model),
        reward=RewardConfig(model=ModelConfig(path=reward), resources=small),
        critic=CriticConfig(
            trainable_layers=None,
            optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
            deepspeed=DeepSpeedConfig(zero_stage=0, precision="fp32"),
            resources=small,
        ),
        policy=PolicyConfig(
            trainable_layers=1,
            optim=OptimConfig(lr=1e-2, warmup_ratio=0.0, min_lr_ratio=1.0),
            deepspeed=DeepSpeedConfig(zero_stage=0, precision="fp32"),
            resources=small,
        ),
        rollout=RolloutConfig(
            engine=EngineConfig(backend=backend, max_model_len=1024, hf_batch_prompts=True),
            resources=small,
            chunk_size=8,
        ),
        sampling=SamplingConfig(n=1, max_new_tokens=16, temperature=1.0, top_p=1.0),
        kl=KLConfig(init_beta=0.1, target=6.0, horizon=16),
        iterations=20,
        rollout_size=16,
        minibatch_size=8,
        micro_batch_size=8,
        ppo_epochs=2,
        max_prompt_tokens=60,  # short prompts: the response weighs more in the score
        checkpoint=CheckpointEvery(every_iterations=10),
        cluster=ClusterConfig(address="auto"),
    )
    fields.update(overrides)
    return PPOConfig(**fields)


def check_learning(out: Path, iterations: int) -> list[dict]:
    """Reward up by a clear margin, KL bounded, engines in step with the policy, all logged."""
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in history] == list(range(1, iterations + 1))
    rewards = [h["reward_mean"] for h in history]
    first = sum(rewards[:3]) / 3
    best = max(sum(rewards[i : i + 3]) / 3 for i in range(len(rewards) - 2))
    assert best - first > 1.0, [round(r, 2) for r in rewards]
    kl = [h["kl"] for h in history]
    assert kl[0] == pytest.approx(0.0, abs=1e-4)  # pi == pi_0 before any update
    # The adaptive controller raised beta once KL passed its target, and pulled KL back down.
    assert history[-1]["beta"] > history[0]["beta"]
    assert kl[-1] < 0.75 * max(kl), [round(k, 1) for k in kl]
    # Every rollout was sampled from the policy's current weights: sync works.
    assert max(h["rollout_logprob_gap"] for h in history) < 1e-4
    for key in ("entropy", "clip_fraction", "approx_kl", "value_loss", "reward_std",
                "generate_s", "experience_s", "train_s", "sync_s", "response_length"):  # fmt: skip
        assert all(key in h for h in history), key
    assert list((out / "tensorboard").glob("events.*"))
    return history


def check_only_top_layers_moved(out: Path, sft: str) -> None:
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(sft).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    for name, tensor in before.items():
        moved = not tensor.equal(after[name])
        trainable = name.startswith(("model.layers.1.", "model.norm", "lm_head"))
        assert moved == trainable or (trainable and "norm" in name), name


def test_ppo_with_hf_rollouts_raises_the_reward(
    ppo_inputs, tiny_model_dir: str, tmp_path: Path, local_ray
) -> None:
    out = tmp_path / "ppo-hf"
    manifest = ppo.main(
        ppo_config(ppo_inputs, tiny_model_dir, out, "hf", weight_sync="object_store")
    )
    assert manifest["stage"] == "ppo" and manifest["reference"] == "frozen_trunk"
    assert (
        manifest["training"]["iterations"] == 20
        and manifest["training"]["prompts"] + manifest["training"]["rejected_prompts"] == 40
    )
    check_learning(out, 20)
    check_only_top_layers_moved(out, tiny_model_dir)
    assert sorted(os.listdir(out / "checkpoints")) == ["iter_000010", "iter_000020", "latest"]
    # Done is done: a rerun returns the manifest without training again.
    assert ppo.main(ppo_config(ppo_inputs, tiny_model_dir, out, "hf")) == manifest


@pytest.mark.vllm
def test_ppo_with_vllm_rollouts_raises_the_reward_and_vllm_loads_the_result(
    ppo_inputs, tiny_model_dir: str, tmp_path: Path, local_ray, vllm_check
) -> None:
    import ray

    out = tmp_path / "ppo-vllm"
    ppo.main(ppo_config(ppo_inputs, tiny_model_dir, out, "vllm", weight_sync="broadcast"))
    check_learning(out, 20)

    import torch
    from transformers import AutoModelForCausalLM

    one = SamplingConfig(n=1, max_new_tokens=8, temperature=1.0, top_p=1.0)
    sample = ray.get(vllm_check.generate.remote(str(out), [[0, 50, 60, 70]], [one], [1]))[0][0][0]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[0, 50, 60, 70, *sample.token_ids]])
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids).logits[0, 3:-1], -1)
    expected = log_p.gather(-1, ids[0, 4:, None])[:, 0]
    assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)


def test_ppo_with_rollout_engines_on_the_policy_bundles_raises_the_reward(
    ppo_inputs, tiny_model_dir: str, tmp_path: Path, local_ray
) -> None:
    """The hybrid-engine placement on CPU bundles: rollout engines share the policy's placement
    group (critic and reward share another); streamed rollouts; the weights handed over bucket by
    bucket (``weight_sync: auto`` -> ipc; on CPUs the bucket travels through the object store
    where a GPU passes a CUDA IPC handle), each engine holding one bucket at a time."""
    from ray.util import placement_group_table

    out = tmp_path / "ppo-colocated"
    config = ppo_config(
        ppo_inputs, tiny_model_dir, out, "hf",
        colocate=[["policy", "rollout"], ["critic", "reward"]],
        weight_sync="auto", sync_bucket_mb=0.05,
    )  # fmt: skip
    config.rollout.engine.sleep_mode = True  # no sleep mode on CPUs: placement only
    manifest = ppo.main(config)
    history = check_learning(out, 20)
    assert manifest["weight_sync"] == "ipc"
    assert manifest["placement"]["rollout"] == manifest["placement"]["policy"]
    names = {g["name"] for g in placement_group_table().values()}  # this session's groups
    assert {"ppo-policy+rollout", "ppo-critic+reward"} <= names
    assert all(h["sync_peak_buckets"] == 1 and h["sync_mb"] > 0.05 for h in history)
    assert all(h["overlap_fraction"] >= 0 and h["engine_batch"] > 0 for h in history)


# What the Grafana dashboard plots of an RL stage (tests/test_cluster_metrics.py checks that
# each plotted series is exported by some stage).
RL_SERIES = ["ppo_reward_mean", "ppo_kl", "ppo_response_length", "ppo_clip_fraction",
             "ppo_rollout_tokens_per_s", "ppo_generate_s", "ppo_experience_s", "ppo_train_s",
             "ppo_sync_s"]  # fmt: skip


@pytest.mark.system  # a driver killed next to the `ray start` head and rerun (as in the
# consultation-RL system test): in make test-system, which has the room
def test_killed_ppo_job_resumes_from_its_checkpoint(
    ppo_inputs, tiny_model_dir: str, tmp_path: Path, cluster_head: ClusterHead
) -> None:
    """jobs/tiny/ppo.yaml run next to the tests' `ray start` head (it joins it), killed after a
    checkpoint and rerun; its series reach the node's metrics endpoint, tagged by stage and job."""
    prompts, reward = ppo_inputs
    out = tmp_path / "ppo-killed"
    cmd = [
        sys.executable, "-m", "huatuo_ray", "ppo", "--config", str(REPO / "jobs/tiny/ppo.yaml"),
        f"inputs=[{prompts}]", f"output={out}", f"model.path={tiny_model_dir}",
        f"reward.model.path={reward}", "iterations=8", "checkpoint.every_iterations=2",
        "sampling.max_new_tokens=12",
    ]  # fmt: skip
    env = cluster_head.stage_env()
    with MetricsScraper(cluster_head.metrics_url) as scraper:  # while both runs run
        latest, metrics = out / "checkpoints" / "latest", out / "metrics.jsonl"
        # Kill after the iteration-2 checkpoint and at least one more iteration.
        kill_when(cmd, REPO, env, poll_s=0.2, ready=lambda: (
            latest.exists() and len(metrics.read_text().splitlines()) >= 3))  # fmt: skip
        killed = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert not (out / "manifest.json").exists()
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    assert cluster_head.address.split(":")[1] in res.stderr  # it joined the head
    missing = scraper.missing("ppo", RL_SERIES)
    assert not missing, (missing, sorted(scraper.seen))
    manifest = json.loads((out / "manifest.json").read_text())
    restarts = manifest["training"]["restarts"]
    assert len(restarts) == 1 and restarts[0] >= 2 and restarts[0] % 2 == 0
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [h["iteration"] for h in history] == list(range(1, 9))
    # The iterations redone after the restart drew the same prompts and samples and trained the
    # same way as before the kill: same rewards, same KL.
    redone = [h for h in killed if h["iteration"] > restarts[0]]
    assert redone, "the kill came right at a checkpoint"
    for before in redone:
        after = history[before["iteration"] - 1]
        for key in ("reward_mean", "kl", "response_length"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-5), key


@pytest.mark.cluster
@pytest.mark.system
def test_ppo_on_two_nodes_spreads_rollouts_and_runs_data_parallel_groups(
    ppo_inputs, tiny_model_dir: str, tmp_path: Path
) -> None:
    prompts, reward = ppo_inputs
    out = tmp_path / "ppo-2nodes"
    res = subprocess.run(
        [sys.executable, "-m", "tests.ppo_two_nodes", prompts, reward, tiny_model_dir, str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("MANIFEST "))
    manifest = json.loads(line.removeprefix("MANIFEST "))
    assert manifest["training"]["iterations"] == 3
    assert manifest["reference"] == "separate"
    placement = manifest["placement"]
    assert len(manifest["nodes"]) == 2
    assert set(placement["rollout"]) == set(manifest["nodes"])  # one engine on each node
    assert len(placement["policy"]) == len(placement["critic"]) == 2
    assert len(placement["reference"]) == 1
    # Colocated: reward worker i shares critic worker i's bundle, hence its node.
    assert placement["reward"] == placement["critic"]
    # Rollouts still came from the policy's weights after each sync, across nodes.
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(h["rollout_logprob_gap"] for h in history) < 1e-4
    # The ZeRO-3 policy's shards were gathered into one Hugging Face folder.
    check_only_top_layers_moved(out, tiny_model_dir)
