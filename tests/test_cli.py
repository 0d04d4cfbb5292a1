"""The command line: stage list, per-stage help, config errors, and the data stage end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from huatuo_ray.__main__ import main, split_args
from huatuo_ray.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "huatuo_ray", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_stage() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for name, stage in STAGES.items():
        assert f"  {name}" in out.stdout and stage.summary in out.stdout


def test_import_is_light() -> None:
    """`import huatuo_ray` and `--help` must not pull in Ray, torch, DeepSpeed or vLLM."""
    code = (
        "import sys, huatuo_ray, huatuo_ray.__main__, huatuo_ray.config, huatuo_ray.dialogue;"
        "import huatuo_ray.data.convert, huatuo_ray.models.stage;"
        "heavy = [m for m in ('ray', 'torch', 'deepspeed', 'vllm', 'transformers') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_help_documents_config(name: str, capsys: pytest.CaptureFixture) -> None:
    import dataclasses

    assert main([name, "--help"]) == 0
    text = capsys.readouterr().out
    config_cls, _ = STAGES[name].load()
    assert "Config keys:" in text
    for f in dataclasses.fields(config_cls):  # every key is documented, with its help
        assert f"  {f.name}" in text or f"[{f.name}]" in text, f.name


def test_split_args() -> None:
    config, overrides, want_help = split_args(
        ["--config", "a.yaml", "--input", "x y", "--shard-rows=5", "cluster.num_cpus=1"]
    )
    assert config == "a.yaml" and not want_help
    assert overrides == ["input=x y", "shard_rows=5", "cluster.num_cpus=1"]


def test_config_error_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "data.yaml"
    bad.write_text("source: jsonl\ninput: x\noutput: y\nshard_rowz: 3\n")
    out = run_cli("data", "--config", str(bad))
    assert out.returncode == 2
    assert f"{bad}: unknown key 'shard_rowz'" in out.stderr
    out = run_cli("data", "--source", "nope", "--input", "x", "--output", "y")
    assert out.returncode == 2 and "source 'nope' is not one of" in out.stderr


@pytest.mark.slow
def test_data_stage_on_real_sample(tmp_path: Path, shared_datasets: Path) -> None:
    """`python -m huatuo_ray data` on the GB18030 CSV sample, in-process Ray, then a no-op rerun."""
    csv = shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
    out_dir = tmp_path / "cmd"
    args = ("data", "--source", "cmd_csv", "--input", str(csv), "--output", str(out_dir))
    res = run_cli(*args, "cluster.num_cpus=1")
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["rows"] + manifest["rejects"]["count"] == 400
    assert manifest["rows"] >= 390
    assert manifest["config"]["source"] == "cmd_csv"
    mtime = (out_dir / "manifest.json").stat().st_mtime
    res = run_cli(*args, "cluster.num_cpus=1")
    assert res.returncode == 0 and "already complete" in res.stderr
    assert "connected to Ray" not in res.stderr  # nothing to do: no Ray started for it
    assert (out_dir / "manifest.json").stat().st_mtime == mtime
