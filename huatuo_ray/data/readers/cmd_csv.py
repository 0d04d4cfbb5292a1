"""Toyhom Chinese-medical-dialogue-data: one doctor answer per online consultation.

Input: a department CSV (e.g. ``内科5000-33000.csv``) or a folder of ``.csv`` files (name order).
Format: GB18030-encoded, comma-separated, quoted fields (which may hold newlines), header
``department,title,ask,answer`` (any column order).

Rules: the whole file is decoded as GB18030 with ``errors="surrogateescape"`` (a file that is valid
UTF-8 throughout is read as UTF-8 instead, so a re-encoded copy does not turn into mojibake) and
parsed with :mod:`csv`. One record per row: ``[user: ask, assistant: answer]``, where an empty
ask or ``无`` falls back to the title; ``meta``: department, title. Rejected with ``file:line``
(the line where the row starts): a field holding undecodable bytes, a wrong column count, an empty
answer, no ask and no title. Blank lines are skipped. A header without the four columns raises
ValueError.
Id: ``cmd_csv-{file stem}-{line}``.
"""

from __future__ import annotations

import csv
import io
import re

from huatuo_ray import storage
from huatuo_ray.data.readers._util import basename, checked, input_files, stem
from huatuo_ray.data.readers.base import ReadResult, Reject
from huatuo_ray.dialogue import Dialogue, turn

SOURCE = "cmd_csv"
COLUMNS = ("department", "title", "ask", "answer")
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def decode(data: bytes) -> str:
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError:
        content = data.decode("gb18030", errors="surrogateescape")
    return content.lstrip("\ufeff")


def read(path: str) -> ReadResult:
    for file in input_files(path, (".csv",)):
        yield from _read_file(file)


def _read_file(file: str) -> ReadResult:
    name = basename(file)
    rows = csv.reader(io.StringIO(decode(storage.read_bytes(file)), newline=""))
    header = [h.strip() for h in next(rows, [])]
    if not set(COLUMNS) <= set(header):
        raise ValueError(f"{name}: header {header} lacks one of the columns {list(COLUMNS)}")
    index = {c: header.index(c) for c in COLUMNS}
    end = rows.line_num
    for row in rows:
        start, end = end + 1, rows.line_num
        where, raw = f"{name}:{start}", ",".join(row)
        if not row:
            continue
        if any(_UNDECODABLE.search(f) for f in row):
            yield Reject(
                where, "undecodable bytes (not GB18030)", raw.encode(errors="replace").decode()
            )
            continue
        if len(row) != len(header):
            yield Reject(where, f"expected {len(header)} columns, found {len(row)}", raw)
            continue
        department, title, ask, answer = (row[index[c]].strip() for c in COLUMNS)
        question = ask if ask and ask != "无" else title
        if not answer:
            yield Reject(where, "missing or empty answer", raw)
        elif not question:
            yield Reject(where, "no ask and no title", raw)
        else:
            turns = [turn("user", question), turn("assistant", answer)]
            meta = {"department": department, "title": title}
            yield checked(
                Dialogue(f"{SOURCE}-{stem(file)}-{start}", SOURCE, turns, meta), where, raw
            )
