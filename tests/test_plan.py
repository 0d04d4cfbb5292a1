"""`plan`: GPU memory per actor group from the preset, refused when it cannot fit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from huatuo_ray import plan
from huatuo_ray.config import ModelConfig, load_config
from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig

REPO = Path(__file__).resolve().parents[1]
PLAN_LINE = re.compile(r"python -m huatuo_ray plan --config (\S+)((?: --[a-z-]+ \S+)*)")


def _plan(preset: str, *args: str) -> dict:
    overrides = [a.lstrip("-").replace("-", "_") for a in args]
    config = load_config(plan.PlanConfig, None, [f"preset={REPO / preset}", *overrides])
    return plan.main(config)


def test_refuses_13b_critic_and_reward_on_one_40gb_gpu(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as refused:
        _plan("jobs/paper/ppo.yaml", "gpu_memory=40")
    message = str(refused.value)
    line = next(x for x in message.splitlines() if x.strip().startswith("critic+reward:"))
    assert "the GPU has 40 GB" in line and "give critic and reward their own GPUs" in line
    # 2 x 13e9 bf16 weights alone are 52 GB: the estimate is at least that.
    assert float(re.search(r"needs ([\d.]+) GB", line).group(1)) > 52


def test_accepts_the_paper_ppo_preset_on_the_gpus_it_names(capsys: pytest.CaptureFixture) -> None:
    assert "A100-80GB" in (REPO / "jobs/paper/ppo.yaml").read_text()
    result = _plan("jobs/paper/ppo.yaml", "gpu_memory=80")
    assert result["gpus"] == 8 and set(result["groups"]) == {"policy", "rollout", "critic+reward"}
    assert 52 < result["groups"]["critic+reward"] < 80


PRESETS = sorted(
    p.relative_to(REPO).as_posix()
    for folder in ("paper", "open7b")
    for p in (REPO / "jobs" / folder).glob("*.yaml")
    if p.name != "pipeline.yaml"
)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_paper_and_open7b_preset_fits_the_hardware_its_comment_names(
    preset: str, capsys: pytest.CaptureFixture
) -> None:
    text = (REPO / preset).read_text()
    named = PLAN_LINE.search(text)
    args = named.group(2).split() if named else []
    if named:
        assert named.group(1) == preset
    pairs = [f"{args[i]}={args[i + 1]}" for i in range(0, len(args), 2)]
    result = _plan(preset, *pairs)
    if result["groups"]:  # a stage with GPU groups names its hardware
        assert named and "--gpu-memory" in named.group(2), preset


def test_model_size_from_config_json_is_computed_by_hand(tmp_path: Path) -> None:
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    size = plan.model_size(ModelConfig(path=str(tmp_path)))
    # per layer: q,o 2*64*64 + k,v 2*64*32 = 12288; MLP 3*64*128 = 24576; embeddings 2*100*64
    assert size.params == 2 * (12288 + 24576) + 12800
    assert (size.layers, size.hidden, size.vocab) == (2, 64, 100)
    assert plan.model_size(ModelConfig(path="file://" + str(tmp_path))).params == size.params
    assert plan.model_size(ModelConfig(path="Qwen/Qwen2.5-7B")).vocab == 152064
    with pytest.raises(ValueError, match="add model.params"):
        plan.model_size(ModelConfig(path="/nowhere/model"))


def test_zero_stage_and_offload_divide_what_they_should() -> None:
    size = plan.ModelSize(1e9, 10, 1000, 1000, "hand")
    z3 = plan.trained("g", size, 8, DeepSpeedConfig(zero_stage=3), 1, 100, lm_head=False)
    assert z3.parts["weights"] == 2e9 / 8 and z3.parts["gradients"] == 2e9 / 8
    assert z3.parts["optimizer"] == 12e9 / 8
    assert z3.parts["activations"] == 34 * 100 * 1000 * 10
    z1 = plan.trained("g", size, 8, DeepSpeedConfig(zero_stage=1, offload_optimizer=True), 1, 100)
    assert z1.parts["weights"] == 2e9 and z1.parts["gradients"] == 2e9
    assert z1.parts["optimizer"] == 0.0


def test_cli_takes_the_preset_as_config_and_exits_non_zero_when_refused() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "huatuo_ray", "plan", "--config", "jobs/paper/ppo.yaml",
         "--gpu-memory", "40"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and "critic+reward: needs" in run.stderr
    assert "critic+reward" in run.stdout and "GPUs in all: 8" in run.stdout


def test_cluster_configs_name_80gb_gpus() -> None:
    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    assert aws["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] in (
        "p4de.24xlarge", "p5.48xlarge"
    )  # fmt: skip
    (cluster,) = yaml.safe_load_all((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    gpu = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers")
    selector = gpu["template"]["spec"]["nodeSelector"]
    assert "80GB" in selector["nvidia.com/gpu.product"]
