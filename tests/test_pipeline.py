"""The whole tiny recipe as Ray jobs on a real `ray start` head: every stage of
jobs/tiny/pipeline.yaml submitted through the job API, each waiting for the one before; every
artifact checked; the teacher key found in no job's logs, info or metadata, nor in Ray's session
logs. About 6.5 minutes (387 s, 2026-12-04): marked `system`, run by `make test-system` (and CI)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from huatuo_ray import pipeline
from huatuo_ray.config import load_config
from tests.ray_head import local_head

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-pipeline-local-teacher-key-7"


def test_resolved_step_configs_round_trip(tmp_path: Path) -> None:
    """What the pipeline writes for each job loads back to the same config."""
    from huatuo_ray.config import to_dict
    from huatuo_ray.stages import STAGES

    config = load_config(pipeline.PipelineConfig, str(REPO / "jobs/tiny/pipeline.yaml"),
                         [f"rebase.target={tmp_path}", "common=[teacher.base_url=http://x/v1]"])  # fmt: skip
    for index, step in enumerate(config.steps):
        path, values = pipeline.resolve_step(config, index, step)
        config_cls, _ = STAGES[step.stage].load()
        assert to_dict(load_config(config_cls, path)) == values
        text = Path(path).read_text()
        assert "outputs/tiny" not in text.replace(str(tmp_path), "")  # every output rebased
        if "teacher" in values and step.stage != "consult":
            assert values["teacher"]["base_url"] == "http://x/v1"


@pytest.mark.system
@pytest.mark.cluster
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_tiny_recipe_as_a_chain_of_ray_jobs(tmp_path: Path, tiny_model_dir: str) -> None:
    from ray.job_submission import JobSubmissionClient

    from huatuo_ray.inference.openai_server import vllm_server

    root = tmp_path / "shared"
    with vllm_server(tiny_model_dir) as teacher_url:
        # 4 logical CPUs: a step may hold a serving actor (consult) beside its Ray Data workers.
        with local_head(num_cpus=4, node_env={"HUATUO_LOCAL_TEACHER_KEY": SECRET}) as head:
            config = load_config(
                pipeline.PipelineConfig, str(REPO / "jobs/tiny/pipeline.yaml"),
                [f"address={head.dashboard_url}", f"rebase.target={root}", "poll_s=1",
                 pipeline.common_teacher(teacher_url)],
            )  # fmt: skip
            started = time.time()
            result = pipeline.main(config)
            print(f"pipeline: {time.time() - started:.0f} s")
            client = JobSubmissionClient(head.dashboard_url)
            jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("pipeline") == "tiny"]
            logs = "".join(client.get_job_logs(j.submission_id) for j in jobs)
            infos = json.dumps([j.model_dump() for j in jobs], default=str)
            session = [p for p in Path(head.temp_dir).rglob("*")
                       if p.is_file() and "runtime_resources" not in p.parts]  # fmt: skip
            leaked = [str(p) for p in session if SECRET.encode() in p.read_bytes()]
            # Run again: every step is complete, nothing is submitted.
            again = pipeline.main(config)
    steps = result["steps"]
    assert [s["status"] for s in steps] == ["succeeded"] * len(config.steps)
    assert len(jobs) == len(config.steps)
    assert {j.metadata["stage"] for j in jobs} == {s.stage for s in config.steps}
    assert all(s["status"] == "skipped" for s in again["steps"])
    assert SECRET not in logs and SECRET not in infos and not leaked, leaked
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    manifest = json.loads((root / "models" / "ppo" / "manifest.json").read_text())
    assert manifest["training"]["iterations"] == 6
    assert (root / "eval" / "report" / "report.html").exists()
    assert (root / "eval" / "doctors" / "for-raters" / "form.html").exists()
