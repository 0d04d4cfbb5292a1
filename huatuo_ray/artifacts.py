"""Artifacts: how stages hand work to each other.

A **dataset artifact** is a folder::

    part-00000.parquet ...   the records (schema below), in shards of at most ``shard_rows``
    rejects.jsonl            every input row that did not become a record, with where and why
    manifest.json            written last: its presence means the artifact is complete

A **model artifact** is a Hugging Face folder (safetensors, tokenizer with the chat template) with
the same kind of ``manifest.json``.

The manifest holds the schema version, row counts, rejects by reason, the config used, the
manifests of the inputs, timings and, for stages that call a teacher, its usage and cost.
Paths may be local or URIs (see :mod:`huatuo_ray.storage`).
"""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from huatuo_ray import storage
from huatuo_ray.dialogue import Dialogue
from huatuo_ray.inputs import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# The file a finished stage leaves in its output folder: a dataset's manifest, or the summary of a
# stage that writes no dataset (benchmark, judge, report, doctor-export).
DONE_FILES = (MANIFEST, "metrics.json", "results.json", "report.html", "export.json")
REJECTS = "rejects.jsonl"

DIALOGUE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("turns", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("meta", pa.string()),  # JSON text: sources differ in their metadata
    ]
)


class ArtifactError(UserError):
    """A missing, incomplete or unreadable artifact."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def reason_kind(reason: str) -> str:
    """Group rejects by reason with the specifics (numbers, quoted values) taken out. Digits
    inside a name (GB18030, utf-8, max_tokens=1024's field name) stay: only numbers standing on
    their own become N."""
    kind = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    return re.sub(r"(?<![A-Za-z0-9_.])(?<![A-Za-z]-)\d+(?:\.\d+)*(?![A-Za-z0-9_])", "N", kind)


class DatasetWriter:
    """Writes a dataset artifact: shards as rows come, rejects, then the manifest last.

    :meth:`finish` writes the manifest. Without it (a crash) the folder has no manifest and
    readers refuse it.
    """

    def __init__(self, uri: str, shard_rows: int = 10_000, schema: pa.Schema = DIALOGUE_SCHEMA):
        if shard_rows < 1:
            raise ValueError("shard_rows must be at least 1")
        self.uri, self.shard_rows, self.schema = uri, shard_rows, schema
        self.shards: list[dict[str, Any]] = []
        self.rejects: Counter[str] = Counter()
        self.n_rows = 0
        self._pending: list[dict[str, Any]] = []
        self._reject_lines: list[str] = []
        self._started = time.time()
        storage.makedirs(uri)

    def write(self, record: Dialogue | dict[str, Any]) -> None:
        row = record.to_row() if isinstance(record, Dialogue) else record
        self._pending.append(row)
        self.n_rows += 1
        if len(self._pending) >= self.shard_rows:
            self._flush()

    def reject(self, where: str, reason: str, raw: str = "") -> None:
        self.rejects[reason_kind(reason)] += 1
        line = {"where": where, "reason": reason, "raw": raw[:500]}
        self._reject_lines.append(json.dumps(line, ensure_ascii=False))

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"part-{len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self._pending, schema=self.schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes(storage.join(self.uri, name), buf.getvalue())
        self.shards.append({"file": name, "rows": table.num_rows})
        self._pending = []

    def finish(self, stage: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Flush, write rejects and the manifest; return the manifest."""
        self._flush()
        storage.write_bytes(
            storage.join(self.uri, REJECTS),
            ("\n".join(self._reject_lines) + ("\n" if self._reject_lines else "")).encode(),
        )
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": "dataset",
            "stage": stage,
            "created": now(),
            "rows": self.n_rows,
            "shards": self.shards,
            "rejects": {
                "count": sum(self.rejects.values()),
                "by_reason": dict(self.rejects.most_common()),
                "file": REJECTS,
            },
            "config": config,
            "inputs": extra.pop("inputs", []),
            "timings": {
                "seconds": round(time.time() - self._started, 3),
                **extra.pop("timings", {}),
            },
            **extra,
        }
        storage.write_json(storage.join(self.uri, MANIFEST), manifest)
        return manifest


def is_finished(uri: str | None) -> bool:
    """Whether ``uri`` is the output folder of a stage that finished (any of :data:`DONE_FILES`)."""
    return uri is not None and any(storage.exists(storage.join(uri, f)) for f in DONE_FILES)


def read_manifest(uri: str) -> dict[str, Any]:
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path):
        raise ArtifactError(f"{uri} is not a complete artifact: {MANIFEST} is missing")
    manifest = storage.read_json(path)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {manifest.get('schema_version')} is not {SCHEMA_VERSION}"
        )
    if manifest.get("status") == "failed":  # written for inspection, not for use
        raise ArtifactError(f"{uri} records a failed run: {manifest.get('failure', '')}")
    return manifest


def iter_rows(uri: str) -> Iterator[dict[str, Any]]:
    """Rows of a complete dataset artifact, shard by shard, in order."""
    manifest = read_manifest(uri)
    for shard in manifest["shards"]:
        with storage.open_input(storage.join(uri, shard["file"])) as f:
            yield from pq.read_table(f).to_pylist()


def read_dialogues(uri: str) -> list[Dialogue]:
    return [Dialogue.from_row(row) for row in iter_rows(uri)]


def read_rejects(uri: str) -> list[dict[str, Any]]:
    text = storage.read_bytes(storage.join(uri, REJECTS)).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line]


def input_summary(uri: str) -> dict[str, Any]:
    """What a manifest records of an input artifact: its path and its own manifest."""
    return {"uri": uri, "manifest": read_manifest(uri)}


def write_model_manifest(folder: str, stage: str, config: dict[str, Any], **extra: Any) -> None:
    """The manifest of a model artifact (a HF folder saved by the caller)."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "model",
        "stage": stage,
        "created": now(),
        "config": config,
        "inputs": extra.pop("inputs", []),
        **extra,
    }
    storage.write_json(storage.join(folder, MANIFEST), manifest)


def write_all(uri: str, records: Iterable[Dialogue], stage: str, config: dict[str, Any]) -> dict:
    """Small helper for tests and tools: write records as a complete artifact."""
    writer = DatasetWriter(uri)
    for r in records:
        writer.write(r)
    return writer.finish(stage, config)
