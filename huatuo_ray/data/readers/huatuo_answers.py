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
    basename,
    checked,
    excerpt,
    input_files,
    read_json,
    stem,
    text,
)
from huatuo_ray.data.readers.base import ReadResult, Reject
from huatuo_ray.dialogue import Dialogue, turn

SOURCE = "huatuo_answers"


def read(path: str) -> ReadResult:
    seen: dict[str, str] = {}
    for file in input_files(path, (".json",)):
        name, model, data = basename(file), stem(file), read_json(file)
        if not isinstance(data, list):
            raise ValueError(f"{name}: expected a JSON array of answers")
        for i, row in enumerate(data):
            where = f"{name}#{i}"
            if not isinstance(row, dict):
                yield Reject(where, "a row must be a JSON object", excerpt(row))
                continue
            qid, query, answer = (
                row.get("id"),
                text(row.get("query")),
                text(row.get("model_output")),
            )
            if qid in (None, "") or not query or not answer:
                yield Reject(where, "missing id, query or model_output", excerpt(row))
                continue
            record_id = f"{SOURCE}-{model}-{qid}"
            if record_id in seen:
                yield Reject(
                    where, f"duplicate id {qid} (first at {seen[record_id]})", excerpt(row)
                )
                continue
            seen[record_id] = where
            meta = {"qid": qid, "label": row.get("label"), "model": model}
            turns = [turn("user", query), turn("assistant", answer)]
            yield checked(Dialogue(record_id, SOURCE, turns, meta), where, row)
