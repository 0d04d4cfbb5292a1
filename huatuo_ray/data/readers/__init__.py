"""One reader per public dataset format: ``read(path)`` yields Dialogue records and Rejects.

:data:`READERS` maps a source name (the ``source`` of the records it yields, except for the generic
``jsonl``/``parquet`` readers, which keep a row's own ``source``) to its reader; :data:`SOURCE_HELP`
says in one line what input each expects. Each module's docstring documents its format and rules.
"""

from __future__ import annotations

from collections.abc import Callable

from huatuo_ray.data.readers import (
    cmd_csv,
    cmedqa2,
    huatuo26m,
    huatuo_answers,
    jsonl,
    kuake_qic,
    meddialog,
    meddialog_cases,
    parquet,
    webmedqa,
)
from huatuo_ray.data.readers.base import ReadResult, Reject

READERS: dict[str, Callable[[str], ReadResult]] = {
    "cmedqa2": cmedqa2.read,
    "webmedqa": webmedqa.read,
    "huatuo26m": huatuo26m.read,
    "meddialog": meddialog.read,
    "meddialog_cases": meddialog_cases.read,
    "kuake_qic": kuake_qic.read,
    "huatuo_answers": huatuo_answers.read,
    "cmd_csv": cmd_csv.read,
    "jsonl": jsonl.read,
    "parquet": parquet.read,
}

SOURCE_HELP: dict[str, str] = {
    "cmedqa2": "folder with cMedQA2 question.csv + answer.csv "
    "(optional dev_/test_candidates.txt set the split)",
    "webmedqa": "webMedQA medQA.{train,valid,test}.txt (tab-separated, 5 columns) "
    "or a folder of them",
    "huatuo26m": "Huatuo-26M JSONL (questions/answers: string or list) or a folder of .jsonl",
    "meddialog": "MedDialog raw .txt (id=N records) or preprocessed .json "
    "(lists of 病人：/医生： strings), or a folder of them",
    "meddialog_cases": "HuatuoGPT Med-dialog_100.json or HuatuoGPT-II huatuo100_conv/*.json "
    "(file or folder)",
    "kuake_qic": "CBLUE KUAKE-QIC JSON array of {id, query, label?} (file or folder of .json)",
    "huatuo_answers": "HuatuoGPT-II huatuo100_inst/<model>.json: stored answers "
    "{id, label, query, model_output} (file or folder)",
    "cmd_csv": "Toyhom Chinese-medical-dialogue-data GB18030 CSV (department,title,ask,answer) "
    "or a folder of .csv",
    "jsonl": "JSONL of {id, source, turns|messages, meta} dialogues (file or folder of .jsonl)",
    "parquet": "Parquet of {id, source, turns|messages, meta} dialogues (file or folder)",
}

__all__ = ["READERS", "SOURCE_HELP", "ReadResult", "Reject"]
