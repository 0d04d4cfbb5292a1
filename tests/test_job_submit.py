"""Stages submitted as Ray jobs through the dashboard's job API of a real head (the tests'
shared `ray start` head, :func:`tests.conftest.cluster_head`): README's `ray job submit`, the job
API with the key in the nodes' environment, and jobs/submit.sh."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ClusterHead
from tests.ray_head import environment

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def submission_id(cli_output: str) -> str:
    """The job id `ray job submit` prints ("Job 'raysubmit_...' submitted successfully")."""
    return re.search(r"Job '(\S+)' submitted successfully", cli_output).group(1)


def test_submit_data_stage_to_real_head(
    tmp_path: Path, shared_datasets: Path, cluster_head: ClusterHead
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    sample = shared_datasets / "kuake_qic" / "KUAKE-QIC_dev.json"
    out_dir = tmp_path / "kuake"
    head = cluster_head
    with environment(head.env):  # token auth: the client sends ~/.ray/auth_token
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
        job_id = submission_id(submit.stdout + submit.stderr)
        deadline = time.time() + 180
        while not client.get_job_status(job_id).is_terminal():
            assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
            time.sleep(1)
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["rows"] == 300 and manifest["rejects"]["count"] == 0
    assert "wrote" in logs and str(out_dir) in logs


def test_teacher_stage_as_job_keeps_the_key_secret(
    tmp_path: Path, shared_datasets: Path, cluster_head: ClusterHead
) -> None:
    """`polish` as a Ray job: the key lives in the cluster's environment, and it is found nowhere:
    not in the job's logs, its info (entrypoint, metadata, runtime env), Ray's own session logs
    (those of every job the shared head ran so far), nor the output folder."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from huatuo_ray.data.convert import DataConfig, convert
    from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV
    from tests.support.openai_servers import ScriptedOpenAIServer
    from tests.support.scripted_teacher import medical_responder

    source = tmp_path / "cmd"
    convert(
        DataConfig(
            source="cmd_csv",
            input=str(
                shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
            ),
            output=str(source),
            limit=10,
        )
    )
    out = tmp_path / "polished"
    head = cluster_head  # the key is in its nodes' environment, not in the job's
    with ScriptedOpenAIServer(medical_responder, require_api_key=TEACHER_KEY) as teacher:
        client = JobSubmissionClient(head.dashboard_url)
        job_id = client.submit_job(
            entrypoint=(
                f"python -m huatuo_ray polish --input {source} --output {out} "
                f"teacher.base_url={teacher.base_url} teacher.model=scripted-teacher "
                f"teacher.api_key_env={TEACHER_KEY_ENV} workers.num_workers=1"
            ),
            runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git"]},
            metadata={"stage": "polish"},
        )
        deadline = time.time() + 240
        while not client.get_job_status(job_id).is_terminal():
            assert time.time() < deadline
            time.sleep(1)
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
        info = json.dumps(client.get_job_info(job_id).dict(), default=str)
        session_logs = [
            p
            for p in Path(head.temp_dir).rglob("*")
            if p.is_file() and "runtime_resources" not in p.parts
        ]
        leaked = [str(p) for p in session_logs if TEACHER_KEY.encode() in p.read_bytes()]
    assert json.loads((out / "manifest.json").read_text())["rows"] == 10
    assert TEACHER_KEY not in logs and TEACHER_KEY not in info
    assert len(session_logs) > 20 and not leaked, leaked
    for path in out.rglob("*"):
        if path.is_file():
            assert TEACHER_KEY.encode() not in path.read_bytes()


def test_submit_script_runs_a_preset_with_metadata(
    tmp_path: Path, cluster_head: ClusterHead
) -> None:
    """jobs/submit.sh STAGE CONFIG: the runtime env file, job metadata naming the stage."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "consultations"
    head = cluster_head
    env = {**os.environ, **head.env, "RAY_ADDRESS": head.dashboard_url}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    res = subprocess.run(
        ["jobs/submit.sh", "data", "jobs/tiny/data.yaml", f"output={out}"],  # waits for the job
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    client = JobSubmissionClient(head.dashboard_url)
    (job,) = [j for j in client.list_jobs() if f"output={out}" in j.entrypoint]
    assert job.status == JobStatus.SUCCEEDED
    assert job.metadata["stage"] == "data" and job.metadata["config"] == "jobs/tiny/data.yaml"
    assert job.entrypoint.startswith("python -m huatuo_ray data --config jobs/tiny/data.yaml")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 8 and manifest["config"]["source"] == "jsonl"
