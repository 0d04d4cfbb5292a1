"""A response cache in the output folder: a request is paid for once, whatever happens after.

The key is a hash of everything that decides the answer (model, messages, sampling settings and a
``variant`` number used to ask again on purpose). No secret ever goes in: the key and the stored
record hold no headers and no API key. The folder may be remote (any pyarrow filesystem) so every
Ray worker reaches it.

Layout: ``uri/segments/<writer>-<n>.jsonl``, one JSON line per answer (``{"key": ..., ...}``).
Each cache object is one *writer* with its own segment files, so workers never write the same
file. Answers are buffered and appended every ``flush_every`` answers or ``flush_s`` seconds
(checked as answers arrive), on :meth:`flush` (the teacher map calls it after each batch of
records) and on :meth:`close`; on a local disk a writer
appends to one file, on object storage (no append) each flush is one new object. A run killed
with SIGKILL loses only the answers since its last flush; a line cut short by the kill is skipped
when read. The index (key -> record) is built by reading every segment once, on first use; it
holds the records themselves, so a worker's memory grows with the stage's answers (about 100 MB
per 100,000 answers of 1 KB), in exchange for no storage read per lookup.

The one-file-per-answer layout of earlier versions (``uri/ab/abcdef....json``) still reads: a key
the segments do not hold is looked up there when that layout is present.

The ``a``-prefixed methods are for the event loop: the first read of the segments, a legacy
lookup and every flush run in a worker thread, so no request in flight waits on storage.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from huatuo_ray import storage

SEGMENTS = "segments"
#: A local segment is closed and the next one begun past this size (keeps files listable/movable).
SEGMENT_BYTES = 256 * 2**20


def request_key(model: str, messages: list[dict[str, str]], sampling: dict[str, Any]) -> str:
    canonical = json.dumps(
        {"model": model, "messages": messages, "sampling": sampling},
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_segment(data: bytes) -> dict[str, dict[str, Any]]:
    """The records of one segment by key; a damaged or cut line (a killed writer) is skipped."""
    found = {}
    for line in data.splitlines():
        try:
            entry = json.loads(line)
            found[entry.pop("key")] = entry
        except (ValueError, KeyError, AttributeError):
            continue
    return found


class ResponseCache:
    """``get``/``put`` of answer records by request key (see the module docstring).

    ``get`` and ``put`` are synchronous (scripts, the driver); ``aget``, ``aput`` and ``aflush``
    do the same without blocking the event loop. An answer ``put`` is visible to ``get`` of this
    object at once, and to other writers after it is flushed and they (re)load.
    """

    def __init__(
        self, uri: str, flush_every: int = 256, flush_s: float = 1.0, writer: str | None = None
    ):
        if flush_every < 1 or flush_s <= 0:
            raise ValueError("flush_every must be at least 1 and flush_s positive")
        self.uri, self.flush_every, self.flush_s = uri, flush_every, flush_s
        self._flushed_at = time.monotonic()
        self.writer = writer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._index: dict[str, dict[str, Any]] | None = None
        self._legacy = False  # the one-file-per-answer layout is present
        self._pending: list[str] = []  # JSON lines not yet written
        self._load_lock, self._write_lock = threading.Lock(), threading.Lock()
        self._segment, self._segment_bytes = 0, 0
        self.flushes = 0

    # ------------------------------------------------------------------ reading

    def _load(self) -> dict[str, dict[str, Any]]:
        with self._load_lock:
            if self._index is None:
                index: dict[str, dict[str, Any]] = {}
                if storage.is_dir(self.uri):
                    folder = storage.join(self.uri, SEGMENTS)
                    if storage.is_dir(folder):
                        for path in storage.list_files(folder, ".jsonl"):
                            index.update(parse_segment(storage.read_bytes(path)))
                    self._legacy = _has_legacy_layout(self.uri)
                self._index = index
            return self._index

    def _legacy_get(self, key: str) -> dict[str, Any] | None:
        try:
            record = storage.read_json(storage.join(self.uri, key[:2], key + ".json"))
        except (OSError, ValueError):  # missing or damaged: asked again and rewritten
            return None
        self._index[key] = record  # type: ignore[index]
        return record

    def get(self, key: str) -> dict[str, Any] | None:
        hit = self._load().get(key)
        if hit is None and self._legacy:
            hit = self._legacy_get(key)
        return hit

    async def aget(self, key: str) -> dict[str, Any] | None:
        index = self._index if self._index is not None else await asyncio.to_thread(self._load)
        hit = index.get(key)
        if hit is None and self._legacy:
            hit = await asyncio.to_thread(self._legacy_get, key)
        return hit

    def keys(self) -> set[str]:
        """Every key the segments hold (the legacy layout's are not listed)."""
        return set(self._load())

    def __len__(self) -> int:
        return len(self._load())

    # ------------------------------------------------------------------ writing

    def _add(self, key: str, record: dict[str, Any]) -> bool:
        """Index and buffer one answer; True when the buffer is due for a flush."""
        if self._index is None:
            self._load()
        self._index[key] = record  # type: ignore[index]
        self._pending.append(json.dumps({"key": key, **record}, ensure_ascii=False))
        due = time.monotonic() - self._flushed_at >= self.flush_s
        return due or len(self._pending) >= self.flush_every

    def put(self, key: str, record: dict[str, Any]) -> None:
        if self._add(key, record):
            self.flush()

    async def aput(self, key: str, record: dict[str, Any]) -> None:
        if self._index is None:
            await asyncio.to_thread(self._load)
        if self._add(key, record):
            await self.aflush()

    def _take(self) -> list[str]:
        lines, self._pending = self._pending, []
        self._flushed_at = time.monotonic()
        return lines

    def flush(self) -> None:
        """Write the buffered answers now."""
        if lines := self._take():
            self._write(lines)

    async def aflush(self) -> None:
        # The buffer is taken on the loop's thread, so answers put meanwhile go to the next flush.
        if lines := self._take():
            await asyncio.to_thread(self._write, lines)

    close = flush

    def _write(self, lines: list[str]) -> None:
        data = ("\n".join(lines) + "\n").encode("utf-8")
        with self._write_lock:  # flushes of one writer land in order
            fs, base = storage.resolve(storage.join(self.uri, SEGMENTS))
            if isinstance(fs, pafs.LocalFileSystem):
                if self._segment_bytes and self._segment_bytes + len(data) > SEGMENT_BYTES:
                    self._segment, self._segment_bytes = self._segment + 1, 0
                os.makedirs(base, exist_ok=True)
                path = os.path.join(base, f"{self.writer}-{self._segment:05d}.jsonl")
                with open(path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self._segment_bytes += len(data)
            else:  # object stores have no append: one object per flush
                name = f"{self.writer}-{self._segment:05d}.jsonl"
                storage.write_bytes(storage.join(self.uri, SEGMENTS, name), data)
                self._segment += 1
            self.flushes += 1


def _has_legacy_layout(uri: str) -> bool:
    """Whether ``uri`` holds the one-file-per-answer layout's ``ab/`` folders."""
    fs, path = storage.resolve(uri)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        name = info.base_name
        if info.type == pafs.FileType.Directory and len(name) == 2:
            if all(c in "0123456789abcdef" for c in name):
                return True
    return False


class LegacyCache:
    """The one-file-per-answer layout (``uri/ab/<key>.json``, one blocking write per answer),
    kept for the benchmark that measures what the segments gain."""

    def __init__(self, uri: str):
        self.uri = uri

    def put(self, key: str, record: dict[str, Any]) -> None:
        path = storage.join(self.uri, key[:2], key + ".json")
        storage.write_bytes(path, json.dumps(record, ensure_ascii=False).encode("utf-8"))
