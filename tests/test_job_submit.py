"""The `data` stage submitted as a Ray job through the dashboard's job API of a real head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_head import local_head

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_submit_data_stage_to_real_head(tmp_path: Path, shared_datasets: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    sample = shared_datasets / "kuake_qic" / "KUAKE-QIC_dev.json"
    out_dir = tmp_path / "kuake"
    with local_head() as head:
        os.environ.update(head.env)  # token auth: the client sends ~/.ray/auth_token
        try:
            # The same command as README: `ray job submit --working-dir . -- python -m ...`
            submit = subprocess.run(
                [
                    str(Path(sys.executable).with_name("ray")),
                    "job",
                    "submit",
                    "--address",
                    head.dashboard_url,
                    "--working-dir",
                    ".",
                    "--no-wait",
                    "--",
                    "python",
                    "-m",
                    "huatuo_ray",
                    "data",
                    "--source",
                    "kuake_qic",
                    "--input",
                    str(sample),
                    "--output",
                    str(out_dir),
                ],  # fmt: skip
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert submit.returncode == 0, submit.stdout + submit.stderr
            client = JobSubmissionClient(head.dashboard_url)
            job_id = client.list_jobs()[-1].submission_id
            deadline = time.time() + 180
            while not client.get_job_status(job_id).is_terminal():
                assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
                time.sleep(1)
            logs = client.get_job_logs(job_id)
            assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
        finally:
            for key in head.env:
                os.environ.pop(key, None)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["rows"] == 300 and manifest["rejects"]["count"] == 0
    assert "wrote" in logs and str(out_dir) in logs
