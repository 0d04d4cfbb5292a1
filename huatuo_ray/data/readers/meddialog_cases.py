"""The 100 MedDialog evaluation cases of HuatuoGPT (and HuatuoGPT-II's copy with real dialogues).

Input: a JSON file, or a folder of ``.json`` files (read in name order). Two layouts, told apart by
their keys:

* HuatuoGPT ``eval/Med-dialog_100.json``: an array of ``{"id", "medical_case", "doctor_diagnosis",
  "Department"}``;
* HuatuoGPT-II ``evaluation/data/huatuo100_conv/*.json``: an array of ``{"id", "Description",
  "Diagnosis and suggestions", "Doctor faculty", "Real Dialogue", ...}`` (model outputs ignored).

Rules: one record per case, ``turns = [user: medical_case]`` (an evaluation prompt, no answer).
``meta``: case_id, medical_case, doctor_diagnosis, department (``Department``, or ``Doctor
faculty`` in the HuatuoGPT-II layout) and, when present, real_dialogue (the ``Real Dialogue`` text
parsed like raw MedDialog into role/content turns, as written: it may start with the doctor). Id:
``meddialog_cases-{id}``; the same case id seen again (both HuatuoGPT-II files hold the same 100
cases) is rejected as a duplicate. Rejected with ``file#index``: a missing or empty medical case or
diagnosis, a missing id, an unparsable real dialogue.
"""

from __future__ import annotations

from typing import Any

from huatuo_ray.data.readers._util import FirstSeen, checked, excerpt, json_array_items, text
from huatuo_ray.data.readers.base import ReadResult, Reject
from huatuo_ray.data.readers.meddialog import parse_dialogue
from huatuo_ray.dialogue import Dialogue, turn

SOURCE = "meddialog_cases"


def read(path: str) -> ReadResult:
    seen = FirstSeen("case id")
    for item in json_array_items(path, "cases"):
        result = _case(item.value, item.where)
        if isinstance(result, Dialogue):
            yield seen.repeat(result.id, item.where) or result
        else:
            yield result


def _case(row: Any, where: str) -> Dialogue | Reject:
    if not isinstance(row, dict):
        return Reject(where, "a case must be a JSON object", excerpt(row))
    conv = "Description" in row
    case = text(row.get("Description" if conv else "medical_case"))
    diagnosis = text(row.get("Diagnosis and suggestions" if conv else "doctor_diagnosis"))
    if row.get("id") in (None, ""):
        return Reject(where, "missing id", excerpt(row))
    if not case:
        return Reject(where, "missing or empty medical case", excerpt(row))
    if not diagnosis:
        return Reject(where, "missing or empty doctor diagnosis", excerpt(row))
    meta: dict[str, Any] = {
        "case_id": row["id"],
        "medical_case": case,
        "doctor_diagnosis": diagnosis,
        "department": text(row.get("Doctor faculty" if conv else "Department")) or None,
    }
    if "Real Dialogue" in row:
        try:
            meta["real_dialogue"] = parse_dialogue(text(row["Real Dialogue"]).split("\n"))
        except ValueError as e:
            return Reject(where, f"Real Dialogue: {e}", excerpt(row))
    return checked(
        Dialogue(f"{SOURCE}-{row['id']}", SOURCE, [turn("user", case)], meta), where, row
    )
