"""CBLUE KUAKE-QIC: search queries with an intent label (HuatuoGPT's single-turn eval questions).

Input: a JSON file (an array of ``{"id": "s1", "query": "...", "label": "治疗方案"}``; test files
have no ``label``), or a folder of ``.json`` files (read in name order). HuatuoGPT's
``KUAKE-QIC_100.json`` has the same layout.

Rules: one record per query, ``turns = [user: query]``; ``meta``: qid, label (None when absent),
split. Ids restart at ``s1`` in every split, so the split is part of the record id:
``kuake_qic-{split}-{id}``, the split being ``train``/``dev``/``test`` when the file stem ends in
``_train``/``_dev``/``_test``, else the whole stem. Rejected with ``file#index``: a row that is not
an object, a missing id, an empty query, a repeated id.
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

SOURCE = "kuake_qic"


def split_of(file: str) -> str:
    name = stem(file)
    last = name.rsplit("_", 1)[-1].lower()
    return last if last in ("train", "dev", "test") else name


def read(path: str) -> ReadResult:
    return object_records(path, "queries", _record)


def _record(item: Item, seen: FirstSeen) -> Dialogue | Reject:
    row, where, split = item.value, item.where, split_of(item.file)
    qid, query = row.get("id"), text(row.get("query"))
    if qid in (None, ""):
        return Reject(where, "missing id", excerpt(row))
    if not query:
        return Reject(where, "missing or empty query", excerpt(row))
    record_id = f"{SOURCE}-{split}-{qid}"
    if repeat := seen.repeat(record_id, where, excerpt(row), shown=qid):
        return repeat
    meta = {"qid": qid, "label": row.get("label"), "split": split}
    return checked(Dialogue(record_id, SOURCE, [turn("user", query)], meta), where, row)
