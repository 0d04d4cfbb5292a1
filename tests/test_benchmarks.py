"""Benchmarks that cannot rot: every script in ``benchmarks/`` runs here at its smallest size
(``--smoke``) and ends with one JSON line holding its figures; the configurations of every mode,
including those only a GPU can run (``ppo_step.py --gpu``), are built and validated; the device
script is valid shell that calls only what exists."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

# Each script's figures that its issue names (the last line's JSON must hold them).
FIGURES = {
    "sft_throughput.py": {"ratio_vs_plain_loop", "tokens_per_s_stage", "data_wait_fraction"},
    "ppo_step.py": {"streamed_vs_chunked", "engine_batch", "grpo_vs_ppo_iteration", "weight_sync"},
    "serve_load.py": {"concurrent_vs_sequential", "start_s"},
    "teacher_throughput.py": {"ratio_to_bound", "cache_speedup"},
    "peer_grpo.py": {
        "shared_vs_trl",
        "shared_startup_s",
        "trl_startup_s",
        "shared_passes",
    },  # fmt: skip
    "consultation_rollout.py": {"batched_vs_serial", "consultations_per_s", "engine_batch"},
}


def test_every_benchmark_is_listed_here() -> None:
    assert {p.name for p in BENCHMARKS.glob("*.py")} == set(FIGURES)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), BENCHMARKS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Benchmarks that mostly wait (on HTTP, on Ray Serve's start): started together as the module's
# first benchmark starts, each beside the others, as a user's own runs would be on one machine.
# Their figures here are only checked to be there; the measured ones are run alone (RESULTS.md).
BESIDE_THE_OTHERS = ("serve_load.py", "teacher_throughput.py")


def _start(script: str, cwd: Path) -> tuple[subprocess.Popen, Path]:
    """Its own Ray (num_cpus=2) in a subprocess, as a user would run it; its output in files in
    ``cwd`` (a pipe nobody reads yet would stop it once full)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    with open(cwd / "stdout", "w") as out, open(cwd / "stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(BENCHMARKS / script), "--smoke"], cwd=cwd, env=env,
            stdout=out, stderr=err,
        )  # fmt: skip
    return proc, cwd


@pytest.fixture(scope="module")
def started_beside(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    chosen = [s for s in BESIDE_THE_OTHERS
              if any(item.nodeid.endswith(f"[{s}]") for item in request.session.items)]  # fmt: skip
    runs = {s: _start(s, tmp_path_factory.mktemp(s.removesuffix(".py"))) for s in chosen}
    yield runs
    for proc, _ in runs.values():
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(FIGURES))
def test_benchmark_runs_at_its_smallest_size(
    script: str, tmp_path: Path, started_beside: dict
) -> None:
    proc, cwd = started_beside[script] if script in started_beside else _start(script, tmp_path)
    proc.wait(timeout=420)
    assert proc.returncode == 0, (cwd / "stderr").read_text()[-4000:]
    last = json.loads((cwd / "stdout").read_text().strip().splitlines()[-1])
    assert FIGURES[script] <= set(last), FIGURES[script] - set(last)
    if script == "sft_throughput.py":
        assert 0 <= last["data_wait_fraction"] < 1 and last["ratio_vs_plain_loop"] > 0
    if script == "ppo_step.py":
        # HF engines: a streamed share decodes in one batch (8 prompts), chunked 4 at a time.
        assert last["engine_batch"] == 8 and last["chunked_engine_batch"] == 4
        assert last["weight_sync"] == "broadcast"
    if script == "consultation_rollout.py":
        # 3 cases x 2 consultations: all 6 open in the first call, the patients who left gone
        # from the second; one case at a time, at most its 2.
        assert last["engine_batches"][0] == 6 > last["engine_batches"][-1]
        assert last["serial_engine_batch"] <= 2 and last["doctor_turns"] == sum(
            last["engine_batches"])  # fmt: skip
    if script == "peer_grpo.py":
        # One optimizer step per rollout with a separate reference: no old-log-prob pass; the
        # groups take turns on the 2 CPUs (0.4 each reserved, 2.0 in all): the two engines
        # decode together (1 thread each), reference and policy alone in their turns (2).
        assert last["shared_passes"]["policy_old_logprobs"] is False
        # The shared side: policy, reference, reward and its one engine in one process, which
        # has the CPUs of the four groups' bundles (2.0) for torch in each model group's turn.
        assert len({p for pids in last["shared_processes"].values() for p in pids}) == 1
        assert last["shared_torch_threads"] == {"policy": [2], "reference": [2], "reward": [1],
                                                "rollout": [2]}  # fmt: skip
        assert last["shared_vs_trl"] > 0 and last["shared_startup_s"] > 0


def test_ppo_step_gpu_configs_are_the_hybrid_engine_and_validate() -> None:
    """``--gpu``: every group on one GPU, one colocate list, the weights handed over by IPC;
    each run's config passes the stage's own checks (built here, run on the lent GPU)."""
    from huatuo_ray.rlmf.weight_sync import resolve_method

    bench = _load("ppo_step.py")
    args = argparse.Namespace(
        gpu=True, backend="hf", hf=True, no_grpo=False, chunk=8, rollout=64, response_tokens=128,
        iterations=3, ppo_epochs=1, weight_sync="auto",
    )  # fmt: skip
    names = []
    for name, backend, schedule, advantage in bench.runs(args):
        config = bench.config(args, "/tmp/root", backend, schedule, advantage)
        names.append(name)
        assert config.colocate == [["rollout", "policy", "critic", "reward"]]
        assert config.rollout.resources.num_gpus == config.policy.resources.num_gpus == 1
        assert resolve_method(config.weight_sync, config.colocate, on_gpu=True) == "ipc"
        assert config.rows == 64
    assert names == ["chunked", "streamed", "hf_chunked", "grpo"]


def test_the_device_script_is_valid_and_calls_what_exists() -> None:
    for script in (BENCHMARKS / "device").glob("*.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        # Its inline Python parts (here-documents) compile.
        for i, code in enumerate(re.findall(r"<<'PY'\n(.*?)\nPY\n", text, re.S)):
            compile(code, f"{script.name}: python part {i}", "exec")
        for called in set(re.findall(r"benchmarks/([a-z_]+\.py)", text)):
            assert (BENCHMARKS / called).is_file(), (script.name, called)
        for flag in set(re.findall(r"benchmarks/ppo_step\.py([^\n|]*)", text)):
            parser_flags = set(
                re.findall(r'"(--[a-z-]+)"', (BENCHMARKS / "ppo_step.py").read_text())
            )
            assert set(re.findall(r"--[a-z-]+", flag)) <= parser_flags, flag
