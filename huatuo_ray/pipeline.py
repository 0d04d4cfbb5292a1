"""Stage ``pipeline``: the recipe as a chain of Ray jobs, each started when the one before it has
succeeded and left its artifact.

    python -m huatuo_ray pipeline --config jobs/tiny/pipeline.yaml --address http://127.0.0.1:8265
    python -m huatuo_ray pipeline --config jobs/paper/pipeline.yaml --dry-run [--strict]

Each step is a stage and its preset. The pipeline resolves every step's config here (preset +
``overrides`` + ``common`` overrides the stage has keys for, with ``${root}`` set to the
pipeline's ``root``; presets that write relative paths instead have their tree ``rebase.source``,
e.g. ``outputs/tiny``, moved under ``rebase.target``, a folder every node sees), writes the resolved config next to the outputs and submits ``python -m huatuo_ray STAGE --config
THAT`` through the dashboard's job API, with metadata naming the pipeline, step, stage and config.
It waits for the job, checks that the step left its output, then submits the next. A step whose
output is already complete is skipped, so rerunning a failed pipeline starts where it stopped.

With ``address=local`` the same steps run one after another in this process on a local Ray,
with the same skipping (``make demo`` runs ``jobs/tiny/pipeline.yaml`` that way).

``--dry-run`` runs nothing: it checks the artifact graph (:mod:`huatuo_ray.graph`), lists every
step's inputs and where each comes from, and the declared ``external`` inputs that do not exist yet
with the command or download that makes each. A broken graph exits non-zero; missing external
inputs do so only with ``--strict``.

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
class External:
    """An input no step makes: a dataset file, the base model, raters' votes."""

    path: str = option(help="path or URI (${root} allowed), or a hub id with hub: true")
    make: str = option(help="the command or download that makes it")
    hub: bool = option(False, help="a model hub id, fetched when first loaded (not checked)")


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
    root: str = option(
        "", help="folder or URI every step's ${root} paths derive from (every node must see it)"
    )
    external: list[External] = option([], help="declared inputs that no step makes")
    rebase: Rebase = field(default_factory=Rebase)
    common: list[str] = option([], help="overrides for every step whose stage has the key")
    poll_s: float = option(2.0, help="seconds between job status checks")
    step_timeout_s: float = option(3600.0, help="a step running longer fails the pipeline")
    dry_run: bool = option(False, help="check the artifact graph and external inputs; run nothing")
    strict: bool = option(False, help="with dry_run: missing external inputs fail it too")

    def __post_init__(self) -> None:
        from huatuo_ray.graph import IO

        for step in self.steps:
            if step.stage not in IO:
                raise ValueError(f"step {step.stage!r} is not a stage")
        self.external = [
            dataclasses.replace(e, path=e.path.replace("${root}", self.root.rstrip("/")))
            for e in self.external
        ]


#: Where a step's config names a teacher endpoint: the teacher stages' ``teacher``, and
#: consultation RL's patient and rater.
TEACHER_ROLES = ("teacher", "rollout.consultation.patient", "reward.teacher.teacher")


def common_teacher(base_url: str) -> str:
    """The ``common`` override pointing every teacher role of every step at ``base_url``."""
    return "common=[" + ", ".join(f"{role}.base_url={base_url}" for role in TEACHER_ROLES) + "]"


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


def step_values(config: PipelineConfig, step: Step) -> dict[str, Any]:
    """The step's config, resolved (``${root}`` set) and rebased, as plain values."""
    from huatuo_ray.stages import STAGES

    config_cls, _ = STAGES[step.stage].load()
    common = [o for o in config.common if _has_key(config_cls, o.partition("=")[0])]
    root = [f"root={config.root}"] if config.root else []
    preset = os.path.join(config.project_dir, step.config)
    resolved = load_config(config_cls, preset, root + common + list(step.overrides))
    return _rebased(to_dict(resolved), config.rebase.source, config.rebase.target)


def resolve_step(config: PipelineConfig, index: int, step: Step) -> tuple[str, dict[str, Any]]:
    """The step's config, resolved and rebased, written under the target; (path, values)."""
    values = step_values(config, step)
    base = config.rebase.target or config.root or config.project_dir
    if "://" not in base and not os.path.isabs(base):
        base = os.path.join(config.project_dir, base)
    folder = storage.join(base, "_pipeline")
    path = storage.join(folder, f"{index:02d}-{step.stage}-{Path(step.config).stem}.yaml")
    storage.makedirs(folder)
    storage.write_bytes(path, yaml.safe_dump(values, allow_unicode=True, sort_keys=False).encode())
    return path, values


def _output_of(values: dict[str, Any], project_dir: str) -> str | None:
    out = values.get("output")
    if not isinstance(out, str):
        return None
    return out if os.path.isabs(out) or "://" in out else os.path.join(project_dir, out)


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
        if artifacts.is_finished(output):
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


def _exists(path: str, remote_too: bool) -> bool | None:
    """Whether an external input exists; None when not checked (remote, unless strict)."""
    if "://" in path and not path.startswith("file://") and not remote_too:
        return None
    try:
        return storage.exists(path)
    except (OSError, ValueError):  # no credentials, unknown scheme: cannot tell
        return None


def dry_run(config: PipelineConfig) -> dict[str, Any]:
    """Check the artifact graph and external inputs; print the plan; run and write nothing."""
    from huatuo_ray import graph

    steps = [(s.stage, step_values(config, s)) for s in config.steps]
    report = graph.check(steps, [e.path for e in config.external], config.project_dir)
    lines = [f"pipeline {config.name}: {len(steps)} steps, root {config.root or '(presets)'}"]
    for index, (stage, values) in enumerate(steps):
        lines.append(f"  {index:2d} {stage:<15} -> {values.get('output') or '(no output)'}")
        for f in (f for f in report.findings if f.step == index):
            lines.append(f"       {f.key} = {f.path}  [{f.source}]")
    missing = []
    for e in config.external:
        found = None if e.hub else _exists(e.path, config.strict)
        state = {True: "present", False: "MISSING", None: "not checked"}[found]
        lines.append(f"  external {e.path}: {state}")
        if found is not True:
            lines.append(f"       make it: {e.make}")
        if found is False or (config.strict and found is None and not e.hub):
            missing.append(e.path)
    for f in report.broken:
        lines.append(
            f"  BROKEN: step {f.step} ({f.stage}) {f.key} = {f.path}: no earlier step makes it "
            "and it is not declared in external"
        )
    print("\n".join(lines))
    if not report.ok:
        raise SystemExit(f"pipeline {config.name}: {len(report.broken)} inputs come from nowhere")
    if config.strict and missing:
        raise SystemExit(f"pipeline {config.name}: external inputs missing: {', '.join(missing)}")
    return {"pipeline": config.name, "steps": len(steps), "missing_external": missing}


def main(config: PipelineConfig) -> dict[str, Any]:
    if config.dry_run:
        return dry_run(config)
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
        if artifacts.is_finished(output):
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
        if output is not None and not artifacts.is_finished(output):
            raise RuntimeError(f"step {index} ({step.stage}) succeeded but left no {output}")
        ran.append({"step": index, "stage": step.stage, "status": "succeeded", "job_id": job_id,
                    "seconds": round(time.time() - started, 1), "output": output})  # fmt: skip
    return {"pipeline": config.name, "steps": ran}
