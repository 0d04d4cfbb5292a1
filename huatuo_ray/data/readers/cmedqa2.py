"""cMedQA v2.0: Chinese medical questions with doctors' answers (zhangsheng93/cMedQA2).

Input: a folder holding ``question.csv`` (``question_id,content``) and ``answer.csv`` (the
release's ``ans_id,question_id,content``; any column order), UTF-8 CSV with a header; optionally
``dev_candidates.txt`` / ``test_candidates.txt`` (``question_id,ans_id,cnt,label``, 100 rows per
question, label 1 for a correct answer).

Rules: one record per (question, answer) pair, ``[user: question, assistant: answer]``, id
``cmedqa2-{question_id}-{ans_id}``, ``meta``: question_id, ans_id, split. A question found in a
candidates file has that split and uses exactly its label-1 answers (an answer of it in answer.csv
that is not label 1 there is rejected, and so is a label-1 ``ans_id`` absent from answer.csv); any
other question is ``train`` and uses all its answers in answer.csv. Rejected with ``file:line``: a
question with no answer, an answer whose question is not in question.csv, empty content, a wrong
column count, a repeated id, a bad candidates row. A content column that is last in its header
absorbs extra commas (the release writes contents unquoted). A missing question.csv or answer.csv
raises FileNotFoundError; a header without the needed columns raises ValueError.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

from huatuo_ray import storage
from huatuo_ray.data.readers._util import checked
from huatuo_ray.data.readers.base import ReadResult, Reject
from huatuo_ray.dialogue import Dialogue, turn

SOURCE = "cmedqa2"
SPLITS = ("dev", "test")
Row = dict[str, str]


def _rows(folder: str, name: str, columns: tuple[str, ...]) -> Iterator[tuple[int, Row | Reject]]:
    """(line, row as a dict of ``columns``) for each CSV row, or a Reject for a malformed one."""
    uri = storage.join(folder, name)
    content = storage.read_bytes(uri).decode("utf-8-sig")
    reader = csv.reader(io.StringIO(content, newline=""))
    header = [h.strip() for h in next(reader, [])]
    if not set(columns) <= set(header):
        raise ValueError(f"{uri}: header {header} lacks one of the columns {list(columns)}")
    end = reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num
        if not row:
            continue
        if len(row) > len(header) and header[-1] == "content":
            row = row[: len(header) - 1] + [",".join(row[len(header) - 1 :])]
        if len(row) != len(header):
            reason = f"expected {len(header)} columns, found {len(row)}"
            yield start, Reject(f"{name}:{start}", reason, ",".join(row))
        else:
            yield start, {c: row[header.index(c)].strip() for c in columns}


@dataclass
class _Group:
    """The candidates of one question: its split, where it starts and its label-1 ans_ids."""

    split: str
    where: str
    answers: list[str] = field(default_factory=list)


def _candidates(folder: str) -> tuple[dict[str, _Group], list[Reject]]:
    """question_id -> its candidates group, from the candidates files that exist."""
    groups: dict[str, _Group] = {}
    rejects: list[Reject] = []
    for split in SPLITS:
        name = f"{split}_candidates.txt"
        if not storage.exists(storage.join(folder, name)):
            continue
        for line, row in _rows(folder, name, ("question_id", "ans_id", "label")):
            where = f"{name}:{line}"
            if isinstance(row, Reject):
                rejects.append(row)
            elif row["label"] not in ("0", "1"):
                rejects.append(Reject(where, f"bad label {row['label']!r}"))
            elif groups.setdefault(row["question_id"], _Group(split, where)).split != split:
                first = groups[row["question_id"]].where
                rejects.append(Reject(where, f"question is also a candidate at {first}"))
            elif row["label"] == "1":
                groups[row["question_id"]].answers.append(row["ans_id"])
    return groups, rejects


def read(path: str) -> ReadResult:
    for name in ("question.csv", "answer.csv"):  # both checked before anything is yielded
        if not storage.exists(storage.join(path, name)):
            raise FileNotFoundError(f"{storage.join(path, name)}: cmedqa2 needs this file")
    questions: dict[str, tuple[str, str]] = {}  # question_id -> (where, content)
    for line, row in _rows(path, "question.csv", ("question_id", "content")):
        where = f"question.csv:{line}"
        if isinstance(row, Reject):
            yield row
        elif row["question_id"] in questions:
            qid = row["question_id"]
            yield Reject(where, f"duplicate question_id {qid} (first at {questions[qid][0]})")
        else:
            questions[row["question_id"]] = (where, row["content"])

    answers: dict[str, tuple[str, str, str]] = {}  # ans_id -> (where, question_id, content)
    by_question: dict[str, list[str]] = {}
    for line, row in _rows(path, "answer.csv", ("ans_id", "question_id", "content")):
        where = f"answer.csv:{line}"
        if isinstance(row, Reject):
            yield row
        elif row["ans_id"] in answers:
            yield Reject(where, f"duplicate ans_id {row['ans_id']}", row["content"])
        elif row["question_id"] not in questions:
            yield Reject(
                where, f"question_id {row['question_id']} not in question.csv", row["content"]
            )
        else:
            answers[row["ans_id"]] = (where, row["question_id"], row["content"])
            by_question.setdefault(row["question_id"], []).append(row["ans_id"])

    groups, rejects = _candidates(path)
    yield from rejects
    for qid, group in groups.items():
        if qid not in questions:
            yield Reject(group.where, f"candidates for question_id {qid} not in question.csv")
    for qid, (where, question) in questions.items():
        group = groups.get(qid)
        split = group.split if group else "train"
        picked = group.answers if group else by_question.get(qid, [])
        if split != "train":
            for ans_id in by_question.get(qid, []):
                if ans_id not in picked:
                    reason = f"answer {ans_id} of {split} question {qid} is not a label-1 candidate"
                    yield Reject(answers[ans_id][0], reason, answers[ans_id][2])
        if not question:
            yield Reject(where, f"empty content for question_id {qid}")
            continue
        if not picked:
            if group:
                reason = f"no label-1 row for question_id {qid} in {split}_candidates.txt"
            else:
                reason = f"no answer for question_id {qid} in answer.csv"
            yield Reject(where, reason, question)
        for ans_id in picked:
            if ans_id not in answers:
                cands = f"{split}_candidates.txt"
                reason = (
                    f"ans_id {ans_id} (label 1 for question {qid} in {cands}) not in answer.csv"
                )
                yield Reject(where, reason, question)
                continue
            ans_where, _, answer = answers[ans_id]
            if not answer:
                yield Reject(ans_where, f"empty content for ans_id {ans_id}")
                continue
            turns = [turn("user", question), turn("assistant", answer)]
            meta = {"question_id": qid, "ans_id": ans_id, "split": split}
            yield checked(Dialogue(f"{SOURCE}-{qid}-{ans_id}", SOURCE, turns, meta), ans_where)
