"""Outputs that stay, on a real `ray start` head: README's `ray job submit --working-dir .` of a
preset with relative paths writes under the nodes' HUATUO_ROOT (not inside Ray's temporary copy
of the working directory) and says where, in its log and its job's metadata; with no root the job
stops in one line; a direct run next to the head joins it, its `cluster.num_cpus` ignored with a
note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ClusterHead
from tests.ray_head import environment

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _wait(client, job_id: str, timeout: float = 180) -> str:
    deadline = time.time() + timeout
    while not client.get_job_status(job_id).is_terminal():
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    return client.get_job_logs(job_id)


def test_submitted_relative_outputs_land_under_the_root_and_a_direct_run_joins(
    tmp_path: Path, cluster_head: ClusterHead
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from tests.test_job_submit import submission_id

    head = cluster_head
    root = head.root  # the nodes' HUATUO_ROOT
    env = {**os.environ, **head.env, "RAY_ADDRESS": head.dashboard_url}
    env.pop("HUATUO_ROOT", None)  # the client's own environment holds no root
    # README's command, as written (the address comes from RAY_ADDRESS).
    submit = subprocess.run(
        [RAY, "job", "submit", "--working-dir", ".", "--",
         "python", "-m", "huatuo_ray", "data", "--config", "jobs/tiny/data.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    with environment(head.env):
        client = JobSubmissionClient(head.dashboard_url)
        job = client.get_job_info(submission_id(submit.stdout + submit.stderr))
        # Without a root (the nodes' variable emptied for this job): one line, no work.
        refused = client.submit_job(
            entrypoint="python -m huatuo_ray data --config jobs/tiny/data.yaml",
            runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "outputs"],
                         "env_vars": {"HUATUO_ROOT": ""}},
        )  # fmt: skip
        refusal = _wait(client, refused)
        refused_status = client.get_job_status(refused)
    # A direct run on the node, next to the head: ray.init() finds it and joins it.
    direct_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    direct_env["RAY_TMPDIR"] = head.tmpdir
    direct = subprocess.run(
        [sys.executable, "-m", "huatuo_ray", "data", "--config", "jobs/tiny/data.yaml",
         f"output={tmp_path / 'direct'}"],
        cwd=REPO, env=direct_env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    copies = list(Path(head.temp_dir).rglob("working_dir_files/*/outputs"))
    artifact = root / "outputs/tiny/data/consultations"
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["rows"] == 8 and manifest["config"]["output"] == str(artifact)
    assert job.status == JobStatus.SUCCEEDED
    assert f"data output: {artifact}" in submit.stdout  # the job log's last line
    assert job.metadata["output"] == str(artifact)
    assert not copies, copies  # nothing written inside Ray's copy
    assert refused_status == JobStatus.FAILED
    line = next(li for li in refusal.splitlines() if li.startswith("data: relative path"))
    assert "working_dir_files/_ray_pkg_" in line and "HUATUO_ROOT" in line and "root=" in line
    assert "Traceback" not in refusal
    assert direct.returncode == 0, direct.stderr[-3000:]
    assert "cluster.num_cpus=2 ignored" in direct.stderr and "Traceback" not in direct.stderr
    assert ":" + head.address.split(":")[1] + "..." in direct.stderr  # it joined the head
    assert f"data output: {tmp_path / 'direct'}" in direct.stdout
