"""Stage ``pipeline``: the recipe as a chain of Ray jobs, each started when the one before it has
succeeded and left its artifact.

    python -m huatuo_ray pipeline --config jobs/tiny/pipeline.yaml --address http://127.0.0.1:8265

Each step is a stage and its preset. The pipeline resolves every step's config here (preset +
``overrides`` + ``common`` overrides the stage has keys for), moves the presets' relative output
tree (``rebase.source``, e.g. ``outputs/tiny``) under ``rebase.target`` (a folder every node sees),
writes the resolved config next to the outputs and submits ``python -m huatuo_ray STAGE --config
THAT`` through the dashboard's job API, with metadata naming the pipeline, step, stage and config.
It waits for the job, checks that the step left its output, then submits the next. A step whose
output is already complete is skipped, so rerunning a failed pipeline starts where it stopped.

With ``address=local`` the same steps run one after another in this process on a local Ray,
with the same skipping (``make demo`` runs ``jobs/tiny/pipeline.yaml`` that way).

Secrets never travel with the jobs: configs hold only the *names* of environment variables; the
cluster's nodes hold the values (the job's entrypoint, metadata and runtime environment name none).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from huatuo_ray import artifacts, storage
from huatuo_ray.config import load_config, option, to_dict

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
#: What a finished step leaves in its output folder (the manifest, else the stage's own file).
DONE_FILES = (artifacts.MANIFEST, "metrics.json", "results.json", "report.html", "export.json")


@dataclass
class Step:
    """One stage run as one Ray job."""

    stage: str = option(help="stage name")
    config: str = option(help="preset, relative to project_dir")
    overrides: list[str] = option([], help="key.sub=value overrides of this step")


@dataclass
class Rebase:
    """Where the presets' relative outputs go."""

    source: str = option("outputs/tiny", help="path prefix used by the presets")
    target: str = option("", help="folder every node sees (empty: leave paths as they are)")


@dataclass
class PipelineConfig:
    """Run stages one after another as Ray jobs."""

    steps: list[Step] = option(help="the stages in order")
    name: str = option("huatuo", help="pipeline name (in every job's metadata)")
    address: str = option(
        os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="the dashboard's job API; 'local': every step in this process on a local Ray",
    )
    project_dir: str = option(str(REPO), help="the project on the cluster's nodes (jobs run there)")
    rebase: Rebase = field(default_factory=Rebase)
    common: list[str] = option([], help="overrides for every step whose stage has the key")
    poll_s: float = option(2.0, help="seconds between job status checks")
    step_timeout_s: float = option(3600.0, help="a step running longer fails the pipeline")


def _rebased(value: Any, source: str, target: str) -> Any:
    if isinstance(value, str) and target and (value == source or value.startswith(source + "/")):
        return target + value[len(source) :]
    if isinstance(value, list):
        return [_rebased(v, source, target) for v in value]
    if isinstance(value, dict):
        return {k: _rebased(v, source, target) for k, v in value.items()}
    return value


def _has_key(config_cls: type, dotted: str) -> bool:
    import typing

    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        if part not in fields:
            return False
        config_cls = typing.get_type_hints(config_cls)[part]
        if not dataclasses.is_dataclass(config_cls):
            return part == dotted.split(".")[-1]
    return True


def resolve_step(config: PipelineConfig, index: int, step: Step) -> tuple[str, dict[str, Any]]:
    """The step's config, resolved and rebased, written under the target; (path, values)."""
    from huatuo_ray.stages import STAGES

    config_cls, _ = STAGES[step.stage].load()
    common = [o for o in config.common if _has_key(config_cls, o.partition("=")[0])]
    preset = os.path.join(config.project_dir, step.config)
    resolved = load_config(config_cls, preset, common + list(step.overrides))
    values = _rebased(to_dict(resolved), config.rebase.source, config.rebase.target)
    folder = os.path.join(config.rebase.target or config.project_dir, "_pipeline")
    path = os.path.join(folder, f"{index:02d}-{step.stage}-{Path(step.config).stem}.yaml")
    storage.makedirs(folder)
    storage.write_bytes(path, yaml.safe_dump(values, allow_unicode=True, sort_keys=False).encode())
    return path, values


def _output_of(values: dict[str, Any], project_dir: str) -> str | None:
    out = values.get("output")
    if not isinstance(out, str):
        return None
    return out if os.path.isabs(out) or "://" in out else os.path.join(project_dir, out)


def is_done(output: str | None) -> bool:
    return output is not None and any(storage.exists(storage.join(output, f)) for f in DONE_FILES)


def run_in_process(config: PipelineConfig, before: Any = None) -> list[dict[str, Any]]:
    """Every step in this process, in order, skipping complete ones; ``before(index, step)`` is
    called before each step that runs. Returns per step its status, output and manifest (or the
    stage's result)."""
    from huatuo_ray.inputs import check_inputs
    from huatuo_ray.stages import STAGES

    ran: list[dict[str, Any]] = []
    for index, step in enumerate(config.steps):
        path, values = resolve_step(config, index, step)
        output = _output_of(values, config.project_dir)
        record = {"step": index, "stage": step.stage, "config": step.config, "output": output}
        if is_done(output):
            log.warning("pipeline step %d %s: %s is complete, skipped", index, step.stage, output)
            ran.append({**record, "status": "skipped", "result": _result_of(output)})
            continue
        if before is not None:
            before(index, step)
        config_cls, run = STAGES[step.stage].load()
        step_config = load_config(config_cls, path)
        check_inputs(step_config)
        started = time.time()
        result = run(step_config)
        seconds = round(time.time() - started, 1)
        ran.append({**record, "status": "succeeded", "seconds": seconds, "result": result})
    return ran


def _result_of(output: str | None) -> dict[str, Any] | None:
    path = storage.join(output, artifacts.MANIFEST) if output else None
    return storage.read_json(path) if path and storage.exists(path) else None


def main(config: PipelineConfig) -> dict[str, Any]:
    if config.address == "local":
        steps = run_in_process(config)
        return {"pipeline": config.name, "steps": [{k: v for k, v in s.items() if k != "result"}
                                                   for s in steps]}  # fmt: skip
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(config.address)
    ran: list[dict[str, Any]] = []
    for index, step in enumerate(config.steps):
        path, values = resolve_step(config, index, step)
        output = _output_of(values, config.project_dir)
        if is_done(output):
            log.warning("pipeline step %d %s: %s is complete, skipped", index, step.stage, output)
            ran.append({"step": index, "stage": step.stage, "status": "skipped", "output": output})
            continue
        job_id = client.submit_job(
            entrypoint=f"cd {config.project_dir} && python -m huatuo_ray {step.stage} --config {path}",
            metadata={
                "pipeline": config.name,
                "step": str(index),
                "stage": step.stage,
                "config": path,
            },  # fmt: skip
        )
        started = time.time()
        log.warning("pipeline step %d %s: job %s (%s)", index, step.stage, job_id, path)
        while not (status := client.get_job_status(job_id)).is_terminal():
            if time.time() - started > config.step_timeout_s:
                client.stop_job(job_id)
                raise TimeoutError(
                    f"step {index} ({step.stage}) ran over {config.step_timeout_s} s"
                )
            time.sleep(config.poll_s)
        if status != JobStatus.SUCCEEDED:
            tail = client.get_job_logs(job_id)[-3000:]
            raise RuntimeError(f"step {index} ({step.stage}) job {job_id} {status}:\n{tail}")
        if output is not None and not is_done(output):
            raise RuntimeError(f"step {index} ({step.stage}) succeeded but left no {output}")
        ran.append({"step": index, "stage": step.stage, "status": "succeeded", "job_id": job_id,
                    "seconds": round(time.time() - started, 1), "output": output})  # fmt: skip
    return {"pipeline": config.name, "steps": ran}
