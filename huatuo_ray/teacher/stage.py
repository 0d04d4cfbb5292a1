"""The frame every teacher stage runs in: already complete? -> connect -> read -> map -> write.

A teacher stage (``self-instruct``, ``dialogues``, ``polish``, ``score``, ``judge``, ``consult``)
supplies only what is its own:

* a config that extends :class:`TeacherStageConfig` (the fields they all share), or
  :class:`ArtifactStageConfig` for a stage over the records of one dataset artifact;
* a *read* function returning a :class:`StageInput` (the rows to work on, the inputs' manifests),
  or the records of one artifact (:func:`run_on_artifact`);
* a *record function* ``async def fn(row, teacher, **kwargs) -> Outcome``: one input row -> a
  :class:`~huatuo_ray.dialogue.Dialogue` or a rejection reason;
* optionally a *finish* function ``(MapResult, StageInput) -> StageOutput`` that turns the map's
  records into the artifact's records (and extra manifest fields, side files).

:func:`run_teacher_stage` does the rest. The map runs the record function over a Ray Dataset on a
pool of actors, each holding one :class:`~huatuo_ray.teacher.client.TeacherClient`; inside a
batch the rows run concurrently (Ray Data runs only a few async batches per actor at once, so the
fan-out has to happen here).

Resume without paying twice: every answer is cached in the output folder the moment it arrives,
and a rerun recomputes the whole map from the inputs, replaying cached answers. The artifact is
written only at the end, from the map's output, so each input row appears exactly once: as a
record or as a reject.

``teacher.mode: batch`` buys the answers through the Batch API before the map
(:mod:`~huatuo_ray.teacher.batch`): the map then finds them in the cache.

Two ways a stage fails instead of writing an empty success:

* a :class:`~huatuo_ray.teacher.client.TeacherFatalError` (a wrong key, an unknown model, a
  parameter the model refuses, an exhausted quota) passes through the record function and the
  mapper; Ray Data then fails the dataset and :func:`run_teacher_map` raises it again, with the
  server's message, in the driver. Answers bought before it stay cached.
* more rejects than ``max_reject_fraction`` of the inputs: the artifact and its rejects are
  written for inspection with ``status: failed`` in the manifest (so a rerun does not take it for
  complete, and no later stage reads it) and :class:`TooManyRejects` says how many of each kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from huatuo_ray import artifacts, storage, telemetry
from huatuo_ray.config import (
    ClusterConfig,
    ConfigError,
    TeacherConfig,
    input_artifact,
    option,
    to_dict,
)
from huatuo_ray.dialogue import Dialogue, RecordError
from huatuo_ray.teacher.client import (
    BLOCKED,
    RECORD_USAGE,
    TeacherClient,
    TeacherError,
    TeacherFatalError,
    Usage,
)
from huatuo_ray.teacher.grammars import Shape
from huatuo_ray.teacher.parsers import ParseError

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_DIR = "_teacher_cache"


# --------------------------------------------------------------------------- config


@dataclass
class WorkersConfig:
    """Ray Data workers that call the teacher."""

    num_workers: int = option(2, help="actors calling the teacher (each keeps max_concurrency)")
    batch_size: int = option(16, help="records per Ray Data batch; a batch's records run at once")
    max_parse_retries: int = option(
        2, help="ask again (a new, paid request) when an answer does not parse; then reject"
    )

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.batch_size < 1 or self.max_parse_retries < 0:
            raise ValueError("num_workers and batch_size must be >= 1, max_parse_retries >= 0")


@dataclass(kw_only=True)
class TeacherStageConfig:
    """The fields every teacher stage has; a stage's config extends it with its own."""

    output: str = option(help="artifact folder to write (its _teacher_cache makes reruns free)")
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    limit: int | None = option(None, help="use only the first N inputs")
    overwrite: bool = option(False, help="redo a complete artifact (cached answers are reused)")
    shard_rows: int = option(10_000, help="records per Parquet shard")
    max_reject_fraction: float = option(
        0.5,
        help="more rejected inputs than this share fails the stage (exit 1): the artifact and "
        "its rejects are written for inspection, marked failed",
    )
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError("max_reject_fraction must lie in [0, 1]")


@dataclass(kw_only=True)
class ArtifactStageConfig(TeacherStageConfig):
    """A teacher stage over the records of one dataset artifact (the stage's description says
    which records it expects)."""

    input: str = input_artifact("dataset artifact whose records the stage reads", made_by="data")


class TooManyRejects(RuntimeError):
    """A teacher stage rejected more of its inputs than ``max_reject_fraction`` allows."""


# --------------------------------------------------------------------------- records


@dataclass
class Outcome:
    """What a record function returns for one input row."""

    record: Dialogue | None = None
    reason: str = ""  # why there is no record

    @classmethod
    def reject(cls, reason: str) -> Outcome:
        return cls(None, reason)


RecordFn = Callable[..., Awaitable[Outcome]]


async def ask_parsed(
    teacher: TeacherClient,
    messages: list[dict[str, str]],
    parse: Callable[[str], T],
    retries: int,
    grammar: Shape | None = None,
    **sampling: Any,
) -> T:
    """Ask, parse; on a parse error ask again as a new request (``variant``), up to ``retries``.

    ``grammar`` (see :mod:`~huatuo_ray.teacher.grammars`) is sent in the form the teacher
    config's ``structured_outputs`` names. Answers that are no answer are never records:

    * cut at the token limit (``finish_reason: length``): asked again once with twice the
      limit (when a retry is left), then rejected as "answer cut at max_tokens=N";
    * filtered, refused or empty: asked again at most once, then rejected with that reason.

    Raises :class:`RecordError` with the last reason: the record becomes a reject.
    """
    mode = teacher.config.structured_outputs
    if grammar is not None and mode:
        request = grammar.request(str(mode))
        if "extra_body" in request:
            request["extra_body"] = {**teacher.config.extra_body, **request["extra_body"]}
        sampling.update(request)
    raised = blocked_before = False
    why = "?"
    for variant in range(retries + 1):
        answer = await teacher.chat(messages, variant=variant, **sampling)
        if answer.finish_reason == "length":
            why = f"answer cut at max_tokens={teacher.max_tokens(**sampling)}"
            if raised:
                break
            raised = True  # a longer limit may fit the whole answer: try that once
            sampling["max_tokens"] = 2 * teacher.max_tokens(**sampling)
            continue
        if answer.finish_reason in BLOCKED:
            why = BLOCKED_REASONS[answer.finish_reason]
            if blocked_before:
                break
            blocked_before = True
            continue
        try:
            return parse(answer.text)
        except ParseError as e:
            why = f"unparseable teacher answer: {e.reason}"
    raise RecordError(why)


BLOCKED_REASONS = {
    "content_filter": "answer filtered by the teacher's content filter",
    "refusal": "teacher refused to answer",
    "empty": "teacher sent no answer text",
}


# --------------------------------------------------------------------------- the map


class TeacherMapper:
    """A Ray Data callable class: one teacher client per actor, rows of a batch in parallel."""

    def __init__(
        self,
        fn: RecordFn,
        teacher: TeacherConfig,
        cache_uri: str,
        limiter_name: str | None,
        fn_kwargs: dict[str, Any],
        stage: str,
        agents: dict[str, TeacherConfig] | None = None,
        refused: dict[str, str] | None = None,
    ):
        import ray

        from huatuo_ray.teacher.cache import ResponseCache
        from huatuo_ray.teacher.limiter import RemoteLimiter

        self.fn = fn
        self.fn_kwargs, self.stage = dict(fn_kwargs), stage
        limiter = RemoteLimiter(ray.get_actor(limiter_name)) if limiter_name else None
        self.teacher = TeacherClient(teacher, ResponseCache(cache_uri), limiter)
        self.teacher.refused = dict(refused or {})  # batch lines that failed: rejects
        # Other endpoints the record function talks to (e.g. the model under test in ``consult``),
        # passed to it by name; each keeps its own answer cache (not the teacher's limits).
        for name, agent in (agents or {}).items():
            self.fn_kwargs[name] = TeacherClient(
                agent, ResponseCache(storage.join(cache_uri, name))
            )

    async def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        # gather() runs each row in its own task (its own context): this usage is the row's alone.
        usage = Usage()
        RECORD_USAGE.set(usage)
        try:
            outcome = await self.fn(row, self.teacher, **self.fn_kwargs)
        except TeacherFatalError:
            raise  # the stage stops: Ray Data fails the dataset, the driver says why
        except TeacherError as e:
            outcome = Outcome.reject(f"teacher failed: {e}")
        except RecordError as e:
            outcome = Outcome.reject(str(e))
        used = usage.to_dict()
        _count_record(self.stage, bool(outcome.record), used)
        record = outcome.record.to_row() if outcome.record else None
        return {
            "input_id": str(row["id"]),
            "record": json.dumps(record, ensure_ascii=False) if record else "",
            "reason": outcome.reason,
            "usage": json.dumps(used),
        }

    async def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        results = await asyncio.gather(*(self._one(r) for r in rows))
        # The batch's answers reach storage before its records leave: an actor killed later
        # loses nothing that a record was made of.
        await self.teacher.flush()
        for client in self.fn_kwargs.values():
            if isinstance(client, TeacherClient):
                await client.flush()
        return pa.Table.from_pylist(list(results))


def _count_record(stage: str, ok: bool, used: dict[str, Any]) -> None:
    telemetry.count("records_total", 1, stage, outcome="ok" if ok else "rejected")
    telemetry.count("teacher_requests_total", used["paid"], stage, kind="paid")
    telemetry.count("teacher_requests_total", used["cached"], stage, kind="cached")
    telemetry.count("teacher_retries_total", used["retries"], stage)
    tokens = used["prompt_tokens"] + used["completion_tokens"]
    telemetry.count("teacher_tokens_total", tokens, stage)
    telemetry.count("teacher_cost_usd_total", used["cost_usd"], stage)


@dataclass
class MapResult:
    records: list[Dialogue] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (input id, reason)
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


def run_teacher_map(
    rows: list[dict[str, Any]],
    fn: RecordFn,
    teacher: TeacherConfig,
    output: str,
    *,
    workers: int = 2,
    batch_size: int = 16,
    fn_kwargs: dict[str, Any] | None = None,
    limiter_name: str | None = None,
    stage: str = "teacher",
    agents: dict[str, TeacherConfig] | None = None,
    refused: dict[str, str] | None = None,
) -> MapResult:
    """Run the record function over ``rows`` on a pool of ``workers`` actors. ``agents``: more
    OpenAI-compatible endpoints, each given to the record function as a client of that name;
    ``refused``: request keys that fail at once with the given reason (failed batch lines)."""
    import pyarrow as pa
    import ray

    started = time.time()
    result = MapResult()
    if not rows:
        return result
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows))
    ds = ds.repartition(max(1, min(len(rows) // batch_size + 1, workers * 4))).map_batches(
        TeacherMapper,
        fn_constructor_args=(
            fn,
            teacher,
            storage.join(output, CACHE_DIR),
            limiter_name,
            fn_kwargs or {},
            stage,
            agents,
            refused,
        ),
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=workers,
        num_cpus=0.5,
    )
    progress = telemetry.Progress(stage, len(rows))
    try:
        for row in ds.iter_rows():
            result.usage.add(json.loads(row["usage"]))
            progress.update(bool(row["record"]))
            if row["record"]:
                result.records.append(Dialogue.from_row(json.loads(row["record"])))
            else:
                result.rejects.append((row["input_id"], row["reason"]))
    except Exception as e:
        if (fatal := _fatal_cause(e)) is not None:
            raise fatal from None  # one clear message, not Ray's nested traces
        raise
    result.seconds = time.time() - started
    return result


def _fatal_cause(error: BaseException | None) -> TeacherFatalError | None:
    """The :class:`TeacherFatalError` behind Ray's wrappers (RayTaskError, UserCodeException).
    Its ``__cause__`` does not survive the trip from the worker, but its one-line message is in
    the worker's traceback text that the wrapper carries."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, TeacherFatalError):
            return TeacherFatalError(str(error))
        if found := _FATAL_LINE.findall(str(error)):
            return TeacherFatalError(found[-1].strip())
        error = error.__cause__ or getattr(error, "cause", None) or error.__context__
        seen += 1
    return None


_FATAL_LINE = re.compile(r"TeacherFatalError: (.+)")


# --------------------------------------------------------------------------- the stage frame


@dataclass
class StageInput:
    """What a stage's read step hands the map."""

    rows: list[dict[str, Any]]  # dialogue rows, one record-function call each
    inputs: list[dict[str, Any]]  # the inputs' summaries, for the manifest
    usage: Usage | None = None  # teacher calls the read step itself paid for (self-instruct)
    extra: dict[str, Any] = field(default_factory=dict)  # more manifest fields


@dataclass
class StageOutput:
    """What a stage's finish step makes of the map: the artifact's records and manifest extras."""

    records: list[Dialogue]
    extra: dict[str, Any] = field(default_factory=dict)
    # (failed, all) units of a stage whose work is counted in other units than input rows
    # (score: judgements of pairs); None: the map's rejects of the input rows
    failed: tuple[int, int, str] | None = None  # ..., and the units' name


def read_input_rows(uri: str, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for row in artifacts.iter_rows(uri):
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    return rows


def read_artifact(uri: str, limit: int | None) -> Callable[[], StageInput]:
    """The usual read step: the rows of one dataset artifact (the first ``limit``)."""

    def read() -> StageInput:
        return StageInput(read_input_rows(uri, limit), [artifacts.input_summary(uri)])

    return read


def already_complete(output: str, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a finished run (nothing to do), or None after clearing old results.

    A manifest recording a failed run (``status: failed``) is no finished run: it is cleared and
    the stage runs again. The teacher cache under the output folder is kept: it is what makes a
    rerun free.
    """
    path = storage.join(output, artifacts.MANIFEST)
    failed = storage.exists(path) and storage.read_json(path).get("status") == "failed"
    if storage.exists(path) and not overwrite and not failed:
        log.info(
            "%s is already complete; overwrite=true redoes it (cached answers are reused)", output
        )
        return artifacts.read_manifest(output)
    if storage.is_dir(output):
        for path in storage.list_files(output):
            if path.endswith((".parquet", artifacts.REJECTS, artifacts.MANIFEST)):
                storage.delete(path)
    return None


_LIMITERS: dict[str, Any] = {}  # the driver's handles: a named actor lives while one is held


def limiter_for_job(teacher: TeacherConfig) -> str | None:
    """Create the job's shared limiter actor (RPM/TPM limits and the server's rate-limit
    headers); return its name for the workers."""
    import ray

    from huatuo_ray.teacher.limiter import shared_limiter

    rpm, tpm = teacher.requests_per_minute, teacher.tokens_per_minute
    name = f"huatuo-teacher-limiter-{ray.get_runtime_context().get_job_id()}-{rpm}-{tpm}"
    if name not in _LIMITERS:  # a second handle from get_if_exists would not keep it alive
        _LIMITERS[name] = shared_limiter(name, rpm, tpm)
    return name


@contextlib.contextmanager
def _no_agents() -> Iterator[dict[str, TeacherConfig]]:
    yield {}


def run_teacher_stage(
    config: TeacherStageConfig,
    stage: str,
    read: Callable[[], StageInput],
    record_fn: RecordFn,
    *,
    fn_kwargs: dict[str, Any] | None = None,
    finish: Callable[[MapResult, StageInput], StageOutput] | None = None,
    agents: Callable[[], contextlib.AbstractContextManager[dict[str, TeacherConfig]]] = _no_agents,
) -> dict[str, Any]:
    """Return the manifest if the output is complete (no Ray started for it); else connect to
    Ray, read, map the record function over the rows (``retries`` from ``config.workers`` is
    passed to it), finish, and write the artifact and its manifest. ``agents`` opens the other
    endpoints the record function talks to (e.g. the doctor model in ``consult``) for the map's
    duration only."""
    from huatuo_ray.runtime import connect

    if (done := already_complete(config.output, config.overwrite)) is not None:
        return done
    connect(config.cluster, stage)
    given = read()
    kwargs = {"retries": config.workers.max_parse_retries, **(fn_kwargs or {})}
    batched = None
    if config.teacher.mode == "batch":
        if agents is not _no_agents:
            raise ConfigError(
                f"{stage}: teacher.mode=batch is not supported: each turn waits for the model "
                "under test's live answer; use teacher.mode=online"
            )
        from huatuo_ray.teacher.batch import prefetch

        cache_uri = storage.join(config.output, CACHE_DIR)
        batched = prefetch(
            given.rows, record_fn, kwargs, config.teacher, cache_uri, config.output, stage
        )
    refused = batched.failed if batched and config.teacher.batch.failed_lines == "reject" else {}
    with agents() as endpoints:
        result = run_teacher_map(
            given.rows,
            record_fn,
            config.teacher,
            config.output,
            workers=config.workers.num_workers,
            batch_size=config.workers.batch_size,
            fn_kwargs=kwargs,
            limiter_name=limiter_for_job(config.teacher),
            stage=stage,
            agents=endpoints or None,
            refused=refused,
        )
    for usage in (given.usage, batched.usage if batched else None):
        if usage is not None:
            result.usage.add(usage)
    made = finish(result, given) if finish else StageOutput(result.records)
    extra = {"inputs_read": len(given.rows), **given.extra, **made.extra}
    if batched is not None:
        extra["batch"] = batched.report
    failed = made.failed or (len(result.rejects), len(given.rows), "inputs rejected")
    failure = reject_failure(*failed, config.max_reject_fraction)
    if failure:
        extra.update(status="failed", failure=failure)
    manifest = write_result(result, made.records, config, stage, given.inputs, extra=extra)
    if failure:
        by_reason = manifest["rejects"]["by_reason"]
        counted = "; ".join(f"{n} x {reason}" for reason, n in by_reason.items())
        raise TooManyRejects(
            f"{stage}: {failure} (rejects by reason: {counted}); the artifact at "
            f"{config.output} is marked failed, its rejects are in {artifacts.REJECTS}"
        )
    return manifest


def run_on_artifact(
    config: TeacherStageConfig, stage: str, uri: str, record_fn: RecordFn, **frame: Any
) -> dict[str, Any]:
    """:func:`run_teacher_stage` over the records of the dataset artifact ``uri`` (the first
    ``config.limit``); ``frame``: its ``fn_kwargs``, ``finish`` and ``agents``."""
    return run_teacher_stage(config, stage, read_artifact(uri, config.limit), record_fn, **frame)


def reject_failure(rejected: int, total: int, what: str, max_fraction: float) -> str:
    """Why the stage failed on its rejects, or "" when it did not."""
    if total and rejected / total > max_fraction:
        return f"{rejected} of {total} {what}, more than max_reject_fraction={max_fraction:g}"
    return ""


def write_result(
    result: MapResult,
    records: list[Dialogue],
    config: TeacherStageConfig,
    stage: str,
    inputs: list[dict[str, Any]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write the artifact (records sorted by id so reruns are byte-identical) and its manifest."""
    writer = artifacts.DatasetWriter(config.output, config.shard_rows)
    for record in sorted(records, key=lambda r: r.id):
        writer.write(record)
    for input_id, reason in sorted(result.rejects):
        writer.reject(input_id, reason)
    return writer.finish(
        stage,
        to_dict(config),
        inputs=inputs,
        timings={"map_seconds": round(result.seconds, 3)},
        teacher={
            "base_url": config.teacher.base_url,
            "model": config.teacher.model,
            "usage": result.usage.to_dict(),
        },
        **extra,
    )


def count_by(records: list[Dialogue], key: str) -> dict[str, int]:
    """How many records have each value of ``meta[key]`` (e.g. how consultations ended)."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record.meta[key]] = counts.get(record.meta[key], 0) + 1
    return counts
