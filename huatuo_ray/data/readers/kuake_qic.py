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

SOURCE = "kuake_qic"


def split_of(file: str) -> str:
    name = stem(file)
    last = name.rsplit("_", 1)[-1].lower()
    return last if last in ("train", "dev", "test") else name


def read(path: str) -> ReadResult:
    seen: dict[str, str] = {}
    for file in input_files(path, (".json",)):
        name, split, data = basename(file), split_of(file), read_json(file)
        if not isinstance(data, list):
            raise ValueError(f"{name}: expected a JSON array of queries")
        for i, row in enumerate(data):
            where = f"{name}#{i}"
            if not isinstance(row, dict):
                yield Reject(where, "a row must be a JSON object", excerpt(row))
                continue
            qid, query = row.get("id"), text(row.get("query"))
            if qid in (None, ""):
                yield Reject(where, "missing id", excerpt(row))
                continue
            if not query:
                yield Reject(where, "missing or empty query", excerpt(row))
                continue
            record_id = f"{SOURCE}-{split}-{qid}"
            if record_id in seen:
                yield Reject(
                    where, f"duplicate id {qid} (first at {seen[record_id]})", excerpt(row)
                )
                continue
            seen[record_id] = where
            meta = {"qid": qid, "label": row.get("label"), "split": split}
            yield checked(Dialogue(record_id, SOURCE, [turn("user", query)], meta), where, row)
