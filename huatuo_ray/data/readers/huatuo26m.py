"""Huatuo-26M (e.g. the ``huatuo26M-testdatasets`` ``test_datasets.jsonl``): question-answer pairs.

Input: a JSONL file or a folder of ``.jsonl`` files (read in name order). Each line is an object
with ``questions`` and ``answers``, each a string or a list of strings.

Rules: one record per line, ``[user: first question, assistant: first answer]``; ``meta``:
extra_questions, extra_answers (the rest of the lists, possibly empty) and ``qid`` when the line has
an ``id``. Id: ``huatuo26m-{id}`` when the line has one, else ``huatuo26m-{file stem}-{line}``.
Rejected with ``file:line``: a line that is not UTF-8 or not a JSON object, a missing or empty
field, a list holding something other than strings, a repeated id. Blank lines are skipped.
"""

from __future__ import annotations

import json
from typing import Any

from huatuo_ray.data.readers._util import FirstSeen, Line, checked, nonblank_lines, stem
from huatuo_ray.data.readers.base import ReadResult, Reject
from huatuo_ray.dialogue import Dialogue, turn

SOURCE = "huatuo26m"


def _texts(value: Any) -> list[str] | None:
    """The stripped strings of a string-or-list field; None when it has another shape."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        return None
    return [x.strip() for x in items]


def _problem(key: str, row: dict[str, Any], items: list[str] | None) -> str | None:
    if row.get(key) is None or items == [] or (items and not items[0]):
        return f"missing or empty {key}"
    if items is None:
        return f"{key} must be a string or a list of strings"
    return None


def read(path: str) -> ReadResult:
    seen = FirstSeen()
    for line in nonblank_lines(path, (".jsonl",)):
        yield line if isinstance(line, Reject) else _record(line, seen)


def _record(line: Line, seen: FirstSeen) -> Dialogue | Reject:
    where, content = line.where, line.text
    try:
        row = json.loads(content)
    except ValueError as e:
        return Reject(where, f"bad JSON: {e}", content)
    if not isinstance(row, dict):
        return Reject(where, "a line must be a JSON object", content)
    questions, answers = _texts(row.get("questions")), _texts(row.get("answers"))
    reason = _problem("questions", row, questions) or _problem("answers", row, answers)
    if reason or not questions or not answers:
        return Reject(where, reason or "", content)
    has_id = row.get("id") not in (None, "")
    record_id = f"{SOURCE}-{row['id']}" if has_id else f"{SOURCE}-{stem(line.file)}-{line.number}"
    if repeat := seen.repeat(record_id, where, content):
        return repeat
    turns = [turn("user", questions[0]), turn("assistant", answers[0])]
    meta: dict[str, Any] = {"extra_questions": questions[1:], "extra_answers": answers[1:]}
    if has_id:
        meta["qid"] = row["id"]
    return checked(Dialogue(record_id, SOURCE, turns, meta), where, content)
