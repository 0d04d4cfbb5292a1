"""Errors a user can fix read as one line with exit code 2; bugs keep their traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from huatuo_ray.__main__ import main
from huatuo_ray.inputs import UserError, check_inputs, looks_local, user_error_in

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "tiny"

# Every stage that reads something, with its tiny preset. Run from an empty folder, every path
# the preset names relative to the repository is missing.
STAGES_WITH_INPUTS = {
    "data": "data.yaml",
    "self-instruct": "self-instruct.yaml",
    "dialogues": "dialogues.yaml",
    "polish": "polish.yaml",
    "mixture": "mixture.yaml",
    "sft": "sft.yaml",
    "sample": "sample.yaml",
    "score": "score.yaml",
    "reward-model": "reward-model.yaml",
    "ppo": "ppo.yaml",
    "grpo": "grpo.yaml",
    "dpo": "dpo.yaml",
    "benchmark": "benchmark.yaml",
    "judge": "judge.yaml",
    "consult": "consult.yaml",
    "doctor-export": "doctor-export.yaml",
    "doctor-import": "doctor-import.yaml",
    "report": "report.yaml",
    "serve": "serve.yaml",
}


@pytest.mark.parametrize("stage", list(STAGES_WITH_INPUTS))
def test_missing_input_is_one_line_and_exit_2(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing the preset names exists here
    args = [stage, "--config", str(TINY / STAGES_WITH_INPUTS[stage])]
    if stage == "self-instruct":  # its default seeds ship with the package: name missing ones
        args.append("seeds=no/such/seeds.jsonl")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    named = re.match(rf"{re.escape(stage)}: (\S+) (does not exist|is not a complete artifact)", err)
    assert named, err
    assert not (tmp_path / named.group(1)).exists()
    assert "check `" in err  # the setting to fix


def test_message_names_the_stage_that_makes_the_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()  # a model folder that exists: the train split is what is missing
    (tmp_path / "half").mkdir()  # a folder without a manifest: not a complete artifact
    assert main(["sft", "--config", str(TINY / "sft.yaml"), "model.path=base", "train=half"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sft: half is not a complete artifact: run `mixture` first, or check `train`"
    )


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        main(["score", "--config", str(TINY / "score.yaml"), "--debug"])


def test_complete_output_needs_no_inputs(tmp_path: Path) -> None:
    from huatuo_ray.config import load_config
    from huatuo_ray.rlmf.score import ScoreConfig

    out = tmp_path / "done"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    config = load_config(ScoreConfig, str(TINY / "score.yaml"), [f"output={out}"])
    check_inputs(config)  # the stage returns the finished manifest: its inputs may be gone


def test_hub_ids_are_not_checked_as_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("IDEA-CCNL/Ziya-LLaMA-13B-Pretrain-v1")
    assert not looks_local("s3://bucket/models/sft")
    assert looks_local("outputs/tiny/models/sft") and looks_local("./sft") and looks_local("/m")
    (tmp_path / "outputs").mkdir()
    assert looks_local("outputs/sft")  # a relative folder under an existing one


def test_user_error_found_behind_a_ray_task(local_ray) -> None:
    import ray

    from huatuo_ray.artifacts import read_manifest

    @ray.remote
    def read(uri: str):
        return read_manifest(uri)

    with pytest.raises(Exception) as raised:
        ray.get(read.remote("/no/such/artifact"))
    found = user_error_in(raised.value)
    assert found is not None and "/no/such/artifact" in str(found)
    assert user_error_in(ValueError("a bug")) is None


def test_report_reads_a_benchmark_output_which_is_no_dataset(tmp_path: Path) -> None:
    from huatuo_ray.config import load_config
    from huatuo_ray.eval.report import ReportConfig

    bench = tmp_path / "benchmark"
    (bench / "demo-consultations").mkdir(parents=True)  # per-set datasets, no manifest on top
    config = load_config(ReportConfig, None, [f"output={tmp_path / 'report'}",
                                              f"benchmarks=[{bench}]"])  # fmt: skip
    with pytest.raises(UserError, match="is not a finished stage's output: run `benchmark` first"):
        check_inputs(config)
    (bench / "metrics.json").write_text("{}")  # what a finished benchmark leaves on top
    check_inputs(config)


def test_a_dashboard_url_as_ray_address_of_a_direct_run_is_one_line(tmp_path: Path) -> None:
    """RAY_ADDRESS exported for `ray job` commands names the dashboard; ray.init() would raise a
    ValueError on it. (A process of its own: this one may already hold a Ray.)"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8275"}
    run = subprocess.run(
        [sys.executable, "-m", "huatuo_ray", "data", "--config", str(TINY / "data.yaml"),
         f"output={tmp_path / 'out'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    err = run.stderr.strip()
    assert "\n" not in err and "cluster.address=HOST:PORT" in err and "Traceback" not in err
