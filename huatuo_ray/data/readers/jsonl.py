"""Generic dialogues already in the project's shape, one JSON object per line.

Input: a JSONL file or a folder of ``.jsonl`` files (read in name order). Each line is
``{"id", "source", "turns": [{"role", "content"}, ...], "meta"}``; OpenAI-style ``messages`` are
accepted instead of ``turns`` (only their ``role`` and ``content`` are kept). ``meta`` may be an
object or a JSON string (as in :meth:`Dialogue.to_row`).

Rules: contents are stripped and the record must pass :meth:`Dialogue.validate` and hold at least
one turn, else it is a Reject with the message and ``file:line``. A missing id becomes
``{file name}-{line}``, a missing source ``jsonl``. Rejected too: a line that is not UTF-8 or not a
JSON object, a repeated id. Blank lines are skipped.
"""

from __future__ import annotations

import json
from typing import Any

from huatuo_ray.data.readers._util import FirstSeen, basename, nonblank_lines
from huatuo_ray.data.readers.base import ReadResult, Reject
from huatuo_ray.dialogue import Dialogue, RecordError

SOURCE = "jsonl"


def _strip(turn: Any) -> Any:
    if isinstance(turn, dict) and isinstance(turn.get("content"), str):
        return {**turn, "content": turn["content"].strip()}
    return turn


def from_obj(row: Any, default_id: str, default_source: str) -> Dialogue:
    """A validated Dialogue from a generic row; raises RecordError naming the problem."""
    if not isinstance(row, dict):
        raise RecordError("a row must be an object")
    if row.get("turns") is not None:
        turns = row["turns"]
    elif row.get("messages") is not None:
        turns = row["messages"]
        if isinstance(turns, list):
            turns = [
                {"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                for m in turns
            ]
    else:
        raise RecordError("no turns or messages")
    if not isinstance(turns, list) or not turns:
        raise RecordError("turns must be a non-empty list")
    meta = row.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError as e:
            raise RecordError(f"meta is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise RecordError("meta must be an object")
    record_id = default_id if row.get("id") in (None, "") else str(row["id"])
    source = str(row.get("source") or default_source)
    return Dialogue(record_id, source, [_strip(t) for t in turns], meta).validate()


def read(path: str) -> ReadResult:
    seen = FirstSeen()
    for line in nonblank_lines(path, (".jsonl",)):
        if isinstance(line, Reject):
            yield line
            continue
        try:
            default_id = f"{basename(line.file)}-{line.number}"
            dialogue = from_obj(json.loads(line.text), default_id, SOURCE)
        except (ValueError, RecordError) as e:  # JSONDecodeError is a ValueError
            yield Reject(line.where, str(e), line.text)
            continue
        yield seen.repeat(dialogue.id, line.where) or dialogue
