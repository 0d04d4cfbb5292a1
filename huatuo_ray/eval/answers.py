"""A model's answers to questions, and the conversations the judges compare.

``generate_answers`` runs the model over prompt rows on Ray Data generation actors (vLLM, or HF
``generate``), greedily, as the ``benchmark`` stage and the ``judge`` stage do.
``conversation`` reads a candidate's record as the conversation it had: the record's turns, plus
``meta.prediction`` when the record holds a generated answer beside its prompt (the
``benchmark``/``judge`` output shape).
"""

from __future__ import annotations

import json
from typing import Any

from huatuo_ray.dialogue import Dialogue
from huatuo_ray.inference.batch import EnginePool, Rows, generate_rows
from huatuo_ray.inference.generation import EngineConfig, SamplingConfig


def generate_answers(
    rows: Rows, model_path: str, engine: EngineConfig, max_new_tokens: int, pool: EnginePool
) -> Rows:
    """Rows with ``prompt_ids`` and ``seed`` in; the same rows with ``meta.prediction`` (one
    greedy answer) out, sorted by id."""
    greedy = SamplingConfig(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    answered = []
    for row in generate_rows(rows, model_path, engine, greedy, pool):
        meta = json.loads(row["meta"])
        meta["prediction"] = meta.pop("responses")[0]
        meta.pop("finished", None)
        answered.append({**row, "meta": json.dumps(meta, ensure_ascii=False)})
    return answered


def conversation(record: Dialogue) -> list[dict[str, str]]:
    """The conversation a candidate had: turns (+ its generated answer, when stored aside)."""
    turns = record.spoken()
    prediction = record.meta.get("prediction")
    if isinstance(prediction, str):
        turns.append({"role": "assistant", "content": prediction})
    return turns


def field_of(record: Dialogue, path: str) -> Any:
    """``id``, ``source`` or ``meta.<key>`` of a record (None when absent)."""
    if path in ("id", "source"):
        return getattr(record, path)
    if path.startswith("meta."):
        return record.meta.get(path[len("meta.") :])
    raise ValueError(f"{path!r}: expected id, source or meta.<key>")
