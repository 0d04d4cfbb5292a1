"""webMedQA (hejunqing/webMedQA): medical questions, each with 1 positive and 4 negative answers.

Input: a file ``medQA.{train,valid,test}.txt`` or a folder of ``.txt`` files (read in name order).
Format: UTF-8, one row per line, 5 tab-separated columns: department, label (1 positive, 0
negative), id, question, answer.

Rules: a label-1 row becomes ``[user: question, assistant: answer]`` with ``meta``: department,
split (``train``/``valid``/``test`` from ``medQA.{split}.txt``, else the file stem), qid. A label-0
row (a sampled wrong answer) is not a record: it is counted as a Reject ``negative candidate
(label 0)``, so nothing disappears silently. Rejected with ``file:line``: a line that is not UTF-8,
a column count other than 5, a label other than 0/1, an empty question or answer. Blank lines are
skipped. Id: ``webmedqa-{split}-{qid}``; a second positive with the same qid in one split gets
``-2``, ``-3``... appended, in file order.
"""

from __future__ import annotations

import re

from huatuo_ray.data.readers._util import basename, checked, nonblank_lines, stem
from huatuo_ray.data.readers.base import ReadResult, Reject
from huatuo_ray.dialogue import Dialogue, turn

SOURCE = "webmedqa"
_SPLIT = re.compile(r"^medQA\.(\w+)\.txt$")


def split_of(file: str) -> str:
    m = _SPLIT.match(basename(file))
    return m.group(1) if m else stem(file)


def read(path: str) -> ReadResult:
    seen: dict[str, int] = {}
    for line in nonblank_lines(path, (".txt",)):
        if isinstance(line, Reject):
            yield line
            continue
        where, content, split = line.where, line.text, split_of(line.file)
        cols = content.split("\t")
        if len(cols) != 5:
            yield Reject(where, f"expected 5 tab-separated columns, found {len(cols)}", content)
            continue
        department, label, qid, question, answer = (c.strip() for c in cols)
        if label == "0":
            yield Reject(where, "negative candidate (label 0)", content)
        elif label != "1":
            yield Reject(where, f"bad label {label!r} (expected 1 or 0)", content)
        elif not question or not answer:
            yield Reject(where, f"empty {'question' if not question else 'answer'}", content)
        else:
            key = f"{SOURCE}-{split}-{qid}"
            seen[key] = seen.get(key, 0) + 1
            record_id = key if seen[key] == 1 else f"{key}-{seen[key]}"
            turns = [turn("user", question), turn("assistant", answer)]
            meta = {"department": department, "split": split, "qid": qid}
            yield checked(Dialogue(record_id, SOURCE, turns, meta), where, content)
