"""Stored model answers to HuatuoGPT's 100 single-turn questions (HuatuoGPT-II's evaluation data).

Input: ``huatuo100_inst/<model>.json`` (or its folder): a JSON array of
``{"id", "label", "query", "model_input", "model_output", ...}``, one model's answers.

Rules: one record per answer, ``turns = [user: query, assistant: model_output]``; ``meta``: qid,
label, model (the file stem), so the ``judge`` stage can match them with another model's answers
to the same questions (``match_on: meta.qid``). The id is ``huatuo_answers-{model}-{qid}``.
Rejected: rows that are not objects, or have no id, query or answer; repeated ids.
"""

from __future__ import annotations

from huatuo_ray.data.readers._util import (
    FirstSeen,
    Item,
    checked,
    excerpt,
    object_records,
    stem,
    text,
)
from huatuo_ray.data.readers.base import ReadResult, Reject
from huatuo_ray.dialogue import Dialogue, turn

SOURCE = "huatuo_answers"


def read(path: str) -> ReadResult:
    return object_records(path, "answers", _record)


def _record(item: Item, seen: FirstSeen) -> Dialogue | Reject:
    row, where, model = item.value, item.where, stem(item.file)
    qid, query, answer = row.get("id"), text(row.get("query")), text(row.get("model_output"))
    if qid in (None, "") or not query or not answer:
        return Reject(where, "missing id, query or model_output", excerpt(row))
    record_id = f"{SOURCE}-{model}-{qid}"
    if repeat := seen.repeat(record_id, where, excerpt(row), shown=qid):
        return repeat
    meta = {"qid": qid, "label": row.get("label"), "model": model}
    turns = [turn("user", query), turn("assistant", answer)]
    return checked(Dialogue(record_id, SOURCE, turns, meta), where, row)
