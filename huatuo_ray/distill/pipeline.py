"""The Ray Data part shared by every teacher stage: records in, teacher work, records out.

A stage gives a *record function*: ``async def fn(row, teacher, **kwargs) -> Outcome``, where the
row is a dialogue row and the outcome a :class:`~huatuo_ray.chat.Dialogue` or a rejection reason.
:func:`run_teacher_map` runs it over a Ray Dataset on a pool of actors, each holding one
:class:`~huatuo_ray.teacher.client.TeacherClient`; inside a batch the rows run concurrently (Ray
Data runs only a few async batches per actor at once, so the fan-out has to happen here).

Resume without paying twice: every answer is cached in the output folder the moment it arrives,
and a rerun recomputes the whole map from the inputs, replaying cached answers. The artifact is
written only at the end, from the map's output, so each input row appears exactly once: as a
record or as a reject.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import artifacts, metrics, storage
from huatuo_ray.chat import Dialogue, RecordError
from huatuo_ray.config import TeacherConfig
from huatuo_ray.teacher.client import RECORD_USAGE, TeacherClient, TeacherError, Usage

log = logging.getLogger(__name__)

CACHE_DIR = "_teacher_cache"


@dataclass
class Outcome:
    """What a record function returns for one input row."""

    record: Dialogue | None = None
    reason: str = ""  # why there is no record

    @classmethod
    def reject(cls, reason: str) -> Outcome:
        return cls(None, reason)


RecordFn = Callable[..., Awaitable[Outcome]]


def _load_fn(path: str) -> RecordFn:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class TeacherMapper:
    """A Ray Data callable class: one teacher client per actor, rows of a batch in parallel."""

    def __init__(
        self,
        fn_path: str,
        teacher: TeacherConfig,
        cache_uri: str,
        limiter_name: str | None,
        fn_kwargs: dict[str, Any],
        stage: str,
        agents: dict[str, TeacherConfig] | None = None,
    ):
        import ray

        from huatuo_ray.teacher.cache import ResponseCache
        from huatuo_ray.teacher.limiter import RemoteLimiter

        self.fn = _load_fn(fn_path)
        self.fn_kwargs, self.stage = dict(fn_kwargs), stage
        limiter = RemoteLimiter(ray.get_actor(limiter_name)) if limiter_name else None
        self.teacher = TeacherClient(teacher, ResponseCache(cache_uri), limiter)
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
        except TeacherError as e:
            outcome = Outcome.reject(f"teacher failed: {e}")
        except RecordError as e:
            outcome = Outcome.reject(str(e))
        used = usage.to_dict()
        metrics.count(
            "records_total", 1, self.stage, outcome="ok" if outcome.record else "rejected"
        )
        metrics.count("teacher_requests_total", used["paid"], self.stage, kind="paid")
        metrics.count("teacher_requests_total", used["cached"], self.stage, kind="cached")
        metrics.count("teacher_retries_total", used["retries"], self.stage)
        tokens = used["prompt_tokens"] + used["completion_tokens"]
        metrics.count("teacher_tokens_total", tokens, self.stage)
        metrics.count("teacher_cost_usd_total", used["cost_usd"], self.stage)
        out = {
            "input_id": str(row["id"]),
            "record": json.dumps(outcome.record.to_row(), ensure_ascii=False)
            if outcome.record
            else "",
            "reason": outcome.reason,
            "usage": json.dumps(used),
        }
        return out

    async def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        results = await asyncio.gather(*(self._one(r) for r in rows))
        return pa.Table.from_pylist(list(results))


@dataclass
class MapResult:
    records: list[Dialogue] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (input id, reason)
    usage: Usage = field(default_factory=Usage)
    seconds: float = 0.0


def run_teacher_map(
    rows: list[dict[str, Any]],
    fn_path: str,
    teacher: TeacherConfig,
    output: str,
    *,
    workers: int = 2,
    batch_size: int = 16,
    fn_kwargs: dict[str, Any] | None = None,
    limiter_name: str | None = None,
    stage: str = "teacher",
    agents: dict[str, TeacherConfig] | None = None,
) -> MapResult:
    """Run the record function over ``rows`` on a pool of ``workers`` actors. ``agents``: more
    OpenAI-compatible endpoints, each given to the record function as a client of that name."""
    import pyarrow as pa
    import ray

    started = time.time()
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows)) if rows else None
    result = MapResult()
    if ds is None:
        return result
    ds = ds.repartition(max(1, min(len(rows) // batch_size + 1, workers * 4))).map_batches(
        TeacherMapper,
        fn_constructor_args=(
            fn_path,
            teacher,
            storage.join(output, CACHE_DIR),
            limiter_name,
            fn_kwargs or {},
            stage,
            agents,
        ),
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=workers,
        num_cpus=0.5,
    )
    progress = metrics.Progress(stage, len(rows))
    for row in ds.iter_rows():
        result.usage.add(json.loads(row["usage"]))
        progress.update(bool(row["record"]))
        if row["record"]:
            result.records.append(Dialogue.from_row(json.loads(row["record"])))
        else:
            result.rejects.append((row["input_id"], row["reason"]))
    result.seconds = time.time() - started
    return result


def write_result(
    result: MapResult,
    output: str,
    stage: str,
    config: dict[str, Any],
    inputs: list[dict[str, Any]],
    teacher: TeacherConfig,
    shard_rows: int = 10_000,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the artifact (records sorted by id so reruns are byte-identical) and its manifest."""
    writer = artifacts.DatasetWriter(output, shard_rows)
    for record in sorted(result.records, key=lambda r: r.id):
        writer.write(record)
    for input_id, reason in sorted(result.rejects):
        writer.reject(input_id, reason)
    return writer.finish(
        stage,
        config,
        inputs=inputs,
        timings={"map_seconds": round(result.seconds, 3)},
        teacher={
            "base_url": teacher.base_url,
            "model": teacher.model,
            "usage": result.usage.to_dict(),
        },
        **(extra or {}),
    )


def read_input_rows(uri: str, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for row in artifacts.iter_rows(uri):
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    return rows
