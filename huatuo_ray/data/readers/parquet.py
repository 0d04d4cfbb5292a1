"""Generic dialogues already in the project's shape, as Parquet (e.g. a dataset artifact's shards).

Input: a ``.parquet`` file or a folder of them (read in name order), read with pyarrow through
:func:`huatuo_ray.storage.open_input` (local paths and URIs). Columns as in
:meth:`Dialogue.to_row`: ``id``, ``source``, ``turns`` (list of ``{role, content}``), ``meta`` (JSON
string or struct); ``messages`` is accepted instead of ``turns``.

Rules: those of :mod:`~huatuo_ray.data.readers.jsonl` (see :func:`jsonl.from_obj`), with rows
located as ``file#index`` (0-based row index in the file) and a missing id becoming
``{file name}-{index}``, a missing source ``parquet``. A file pyarrow cannot open raises.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from huatuo_ray import storage
from huatuo_ray.data.readers._util import FirstSeen, basename, excerpt, input_files
from huatuo_ray.data.readers.base import ReadResult, Reject
from huatuo_ray.data.readers.jsonl import from_obj
from huatuo_ray.dialogue import RecordError

SOURCE = "parquet"


def read(path: str) -> ReadResult:
    seen = FirstSeen()
    for file in input_files(path, (".parquet",)):
        name, index = basename(file), 0
        with storage.open_input(file) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    where, default_id = f"{name}#{index}", f"{name}-{index}"
                    index += 1
                    try:
                        dialogue = from_obj(row, default_id, SOURCE)
                    except RecordError as e:
                        yield Reject(where, str(e), excerpt(row))
                        continue
                    yield seen.repeat(dialogue.id, where) or dialogue
