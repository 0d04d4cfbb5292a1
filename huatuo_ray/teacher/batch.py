"""``teacher.mode: batch``: a stage's teacher requests through the Batch API, at half the price.

The record functions stay as they are. Before the online map, rounds of:

1. **collect**: the record functions run in the driver against a *recording* client that answers
   from the cache and, for a request not cached, notes it and raises
   :class:`~huatuo_ray.teacher.client.NotCached` (nothing is sent). A record that needs several
   requests, or asks again when an answer does not parse, notes its next request in the next
   round, once the answer it depends on is cached;
2. **submit**: the noted requests go into JSONL request files within the service's limits
   (``max_requests_per_file``, ``max_bytes_per_file``), each uploaded (``POST /v1/files``,
   purpose ``batch``) and made a batch (``POST /v1/batches``). The file id and then the batch id
   are written to ``_teacher_batches/state.json`` in the output folder the moment the service
   returns them, before any waiting;
3. **wait**: every batch is looked at with back-off (``poll_s`` x1.5 up to ``poll_max_s``); its
   completed / failed / total counts go to the log and to the dashboard's gauges;
4. **download**: each answer of the output file goes into the same response cache the online
   mode uses; each line of the error file (and every line of a batch that ``failed`` or
   ``expired`` unanswered) is a failed request with its reason.

Rounds repeat until nothing is noted (or ``max_rounds``). The stage's ordinary online map then
runs and finds its answers in the cache; what is still missing (failed lines with
``failed_lines: online``, parse retries with ``parse_retries: online``) is asked online, and failed
lines with ``failed_lines: reject`` make their records rejects with the service's reason.

A killed job resumes: the rerun reads the state file, waits for (or downloads) the batches it
recorded, and leaves their requests out of new files, so no request is submitted twice. A request
file is kept until its batch is downloaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import storage, telemetry
from huatuo_ray.config import TeacherConfig
from huatuo_ray.dialogue import RecordError
from huatuo_ray.teacher.cache import ResponseCache
from huatuo_ray.teacher.client import (
    NotCached,
    TeacherClient,
    TeacherError,
    TeacherFatalError,
    Usage,
    api_key,
    error_fields,
    redact,
    usage_counts,
)

log = logging.getLogger(__name__)

FOLDER = "_teacher_batches"
STATE = "state.json"
#: Statuses after which a batch changes no more.
FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchOutcome:
    """What the batch rounds leave for the online map and the manifest."""

    usage: Usage = field(default_factory=Usage)  # answers bought in batches, discounted
    failed: dict[str, str] = field(default_factory=dict)  # request key -> why its line failed
    report: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- collect


def collect(
    rows: list[dict[str, Any]],
    fn: Callable[..., Any],
    fn_kwargs: dict[str, Any],
    teacher: TeacherConfig,
    cache: ResponseCache,
    skip: set[str],
    refused: dict[str, str],
) -> dict[str, dict[str, Any]]:
    """The requests (key -> request body) the record functions still need, asked of no one.
    Keys in ``skip`` (failed lines) and, with ``parse_retries: online``, asks-again are left
    for the online map; keys in ``refused`` fail as they will in the map (rejects)."""
    client = TeacherClient(teacher, cache)
    client.recording, client.refused = [], refused
    cache.keys()  # the index is loaded once, before the record functions run

    async def one(row: dict[str, Any]) -> None:
        try:
            await fn(row, client, **fn_kwargs)
        except (NotCached, TeacherError, RecordError):
            pass

    async def run() -> None:
        await asyncio.gather(*(one(r) for r in rows))
        # Requests of concurrent sub-tasks (score's pairs) that are still running get noted too.
        for _ in range(100):
            if len(asyncio.all_tasks()) <= 1:
                break
            await asyncio.sleep(0)
        await client.close()

    asyncio.run(run())
    retries_online = teacher.batch.parse_retries == "online"
    return {
        key: body
        for key, variant, body in client.recording
        if key not in skip and not (variant and retries_online)
    }


# --------------------------------------------------------------------------- request files


def request_files(
    requests: dict[str, dict[str, Any]], teacher: TeacherConfig
) -> list[tuple[list[str], bytes]]:
    """(keys, JSONL bytes) per file, each within the request-count and byte limits."""
    url = "/chat/completions" if teacher.api_kind == "azure" else "/v1/chat/completions"
    limits = teacher.batch
    files: list[tuple[list[str], bytes]] = []
    keys: list[str] = []
    lines: list[bytes] = []
    size = 0
    for key in sorted(requests):
        line = json.dumps(
            {"custom_id": key, "method": "POST", "url": url, "body": requests[key]},
            ensure_ascii=False,
        ).encode("utf-8")
        line += b"\n"
        if len(line) > limits.max_bytes_per_file:
            raise TeacherError(f"one batch request is {len(line)} bytes, over max_bytes_per_file")
        if keys and (
            len(keys) >= limits.max_requests_per_file
            or size + len(line) > limits.max_bytes_per_file
        ):
            files.append((keys, b"".join(lines)))
            keys, lines, size = [], [], 0
        keys.append(key)
        lines.append(line)
        size += len(line)
    if keys:
        files.append((keys, b"".join(lines)))
    return files


# --------------------------------------------------------------------------- the service


class BatchRunner:
    """Submits, waits for and downloads the batches of one stage's output folder."""

    def __init__(self, teacher: TeacherConfig, output: str, stage: str, cache: ResponseCache):
        import openai

        self.teacher, self.stage, self.cache = teacher, stage, cache
        self.folder = storage.join(output, FOLDER)
        self.state_path = storage.join(self.folder, STATE)
        self.state: dict[str, Any] = (
            storage.read_json(self.state_path)
            if storage.exists(self.state_path)
            else {"batches": [], "failed": {}}
        )
        self._openai, self._key = openai, api_key(teacher)
        common = {"api_key": self._key, "max_retries": 5, "timeout": teacher.timeout_s}
        if teacher.api_kind == "azure":
            self.client = openai.AzureOpenAI(
                azure_endpoint=teacher.base_url, api_version=teacher.azure_api_version, **common
            )
        else:
            self.client = openai.OpenAI(base_url=teacher.base_url, **common)
        self.usage = Usage()
        self.answered = 0

    def _api(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One Files/Batches call; an HTTP error the SDK's own retries did not get past stops
        the stage with the server's message (the key taken out), as in online mode."""
        try:
            return call(*args, **kwargs)
        except self._openai.APIStatusError as e:
            code, message = error_fields(e)
            said = " ".join(redact(message, self._key).split())[:300]
            raise TeacherFatalError(
                f"the batch API at {self.teacher.base_url} answered HTTP {e.status_code}"
                f"{f' ({code})' if code else ''} to {what}: {said}"
            ) from None

    def _save(self) -> None:
        storage.write_json(self.state_path, self.state)

    @property
    def failed(self) -> dict[str, str]:
        return self.state["failed"]

    def in_flight(self) -> set[str]:
        """Keys of recorded batches not yet downloaded (a killed run's): never sent again."""
        keys: set[str] = set()
        for entry in self.state["batches"]:
            if not entry.get("downloaded"):
                keys.update(self._keys(entry))
        return keys

    def _keys(self, entry: dict[str, Any]) -> list[str]:
        data = storage.read_bytes(storage.join(self.folder, entry["file"]))
        return [json.loads(line)["custom_id"] for line in data.splitlines() if line.strip()]

    def submit(self, requests: dict[str, dict[str, Any]], round_no: int) -> None:
        """Write, upload and create a batch per request file; each id recorded as it comes."""
        for keys, data in request_files(requests, self.teacher):
            name = f"round{round_no:02d}-{len(self.state['batches']):04d}.jsonl"
            storage.write_bytes(storage.join(self.folder, name), data)
            entry: dict[str, Any] = {"file": name, "requests": len(keys), "round": round_no}
            self.state["batches"].append(entry)
            self._save()
            self._create(entry, data)
            log.info("%s: batch %s of %d requests submitted", self.stage, entry["id"], len(keys))

    def _create(self, entry: dict[str, Any], data: bytes | None = None) -> None:
        """Upload the entry's file (unless a killed run already did) and create its batch."""
        if "input_file_id" not in entry:
            data = data or storage.read_bytes(storage.join(self.folder, entry["file"]))
            uploaded = self._api(
                "an upload", self.client.files.create, file=(entry["file"], data), purpose="batch"
            )
            entry["input_file_id"] = uploaded.id
            self._save()
        batch = self._api(
            "a new batch",
            self.client.batches.create,
            input_file_id=entry["input_file_id"],
            endpoint="/chat/completions"
            if self.teacher.api_kind == "azure"
            else "/v1/chat/completions",
            completion_window=self.teacher.batch.completion_window,
            metadata={"stage": self.stage, "file": entry["file"]},
        )
        entry["id"] = batch.id
        self._save()

    def wait_and_download(self) -> None:
        """Poll every recorded batch not yet downloaded until it ends; download each as it does."""
        waiting = [e for e in self.state["batches"] if not e.get("downloaded")]
        for entry in waiting:
            if "id" not in entry:  # killed between writing the file and creating the batch
                self._create(entry)
        delay = self.teacher.batch.poll_s
        while waiting:
            counts = {"completed": 0, "failed": 0, "total": 0}
            for entry in list(waiting):
                batch = self._api("a status look", self.client.batches.retrieve, entry["id"])
                done = batch.request_counts
                for name in counts:
                    counts[name] += getattr(done, name, 0) if done else 0
                log.info(
                    "%s: batch %s %s: %d completed, %d failed of %d",
                    self.stage,
                    entry["id"],
                    batch.status,
                    getattr(done, "completed", 0) if done else 0,
                    getattr(done, "failed", 0) if done else 0,
                    getattr(done, "total", 0) if done else entry["requests"],
                )
                if batch.status in FINAL:
                    self._download(entry, batch)
                    waiting.remove(entry)
            for name, value in counts.items():
                telemetry.gauge(f"teacher_batch_{name}", value, self.stage)
            if waiting:
                time.sleep(delay)
                delay = min(delay * 1.5, self.teacher.batch.poll_max_s)

    def _download(self, entry: dict[str, Any], batch: Any) -> None:
        """Answers into the cache; failed lines, and lines the batch left unanswered, into
        ``failed`` with the reason."""
        unanswered = set(self._keys(entry))
        if batch.output_file_id:
            for line in self._lines(batch.output_file_id):
                if self._store(line):
                    unanswered.discard(line.get("custom_id"))
        if batch.error_file_id:
            for line in self._lines(batch.error_file_id):
                key = line.get("custom_id")
                if key in unanswered:
                    self.failed[key] = line_error(line)
                    unanswered.discard(key)
        why = f"batch {batch.status}"
        if batch.status == "failed" and batch.errors and batch.errors.data:
            first = batch.errors.data[0]
            why += f": {first.code}: {first.message}"
        for key in unanswered:
            self.failed[key] = why
        self.cache.flush()  # the answers are stored before the batch is marked downloaded
        entry.update(downloaded=True, status=batch.status)
        self._save()
        storage.delete(storage.join(self.folder, entry["file"]))

    def _lines(self, file_id: str) -> list[dict[str, Any]]:
        text = self._api("a download", self.client.files.content, file_id).content.decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _store(self, line: dict[str, Any]) -> bool:
        """Cache the answer of an output line with status 200; False for any other line."""
        from openai.types.chat import ChatCompletion

        from huatuo_ray.teacher.client import _read_completion

        response = line.get("response") or {}
        if line.get("error") or response.get("status_code") != 200:
            self.failed[line.get("custom_id", "?")] = line_error(line)
            return False
        try:
            text, usage, finish = _read_completion(ChatCompletion.model_validate(response["body"]))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            self.failed[line["custom_id"]] = "batch answer unreadable"
            return False
        record = {"text": text, "usage": usage, "finish_reason": finish}
        self.cache.put(
            line["custom_id"], {**record, "model": self.teacher.model, "time": time.time()}
        )
        self.failed.pop(line["custom_id"], None)
        discount = self.teacher.batch.discount
        self.usage.add({"paid": 1, **usage_counts(usage, self.teacher, discount)})
        self.answered += 1
        return True


def line_error(line: dict[str, Any]) -> str:
    """The reason of a failed batch line: ``error`` (e.g. ``batch_expired``) or the HTTP error."""
    if isinstance(line.get("error"), dict):
        error = line["error"]
        return f"batch line failed: {error.get('code')}: {error.get('message', '')}"[:300]
    response = line.get("response") or {}
    body = response.get("body") or {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    said = error.get("message", "")
    return f"batch line failed: HTTP {response.get('status_code')}: {said}"[:300]


# --------------------------------------------------------------------------- the rounds


def prefetch(
    rows: list[dict[str, Any]],
    fn: Callable[..., Any],
    fn_kwargs: dict[str, Any],
    teacher: TeacherConfig,
    cache_uri: str,
    output: str,
    stage: str,
) -> BatchOutcome:
    """Batch rounds until the record functions need nothing more (see the module docstring)."""
    cache = ResponseCache(cache_uri)
    runner = BatchRunner(teacher, output, stage, cache)
    runner.wait_and_download()  # a killed run's batches first: their answers change what is needed
    rounds = submitted = 0
    refuse = teacher.batch.failed_lines == "reject"
    while rounds < teacher.batch.max_rounds:
        failed = runner.failed
        needed = collect(rows, fn, fn_kwargs, teacher, cache, set(failed), failed if refuse else {})
        if not needed:
            break
        rounds += 1
        in_flight = runner.in_flight()
        fresh = {k: v for k, v in needed.items() if k not in in_flight}
        log.info(
            "%s: batch round %d: %d requests not cached, %d already in a batch",
            stage, rounds, len(needed), len(needed) - len(fresh),
        )  # fmt: skip
        runner.submit(fresh, rounds)
        submitted += len(fresh)
        runner.wait_and_download()
    cache.close()
    failed = dict(runner.failed)
    by_reason: dict[str, int] = {}
    for why in failed.values():
        by_reason[why] = by_reason.get(why, 0) + 1
    report = {
        "rounds": rounds,
        "batches": [e.get("id") for e in runner.state["batches"]],
        "requests_submitted": submitted,
        "answered": runner.answered,
        "failed_lines": len(failed),
        "failed_by_reason": by_reason,
        "failed_lines_go": teacher.batch.failed_lines,
    }
    return BatchOutcome(runner.usage, failed, report)
