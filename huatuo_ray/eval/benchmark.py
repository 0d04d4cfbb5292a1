"""Stage ``benchmark``: zero-shot answers on QA test sets, scored against the real answers.

    python -m huatuo_ray benchmark --config jobs/tiny/benchmark.yaml

Each set is a dialogue artifact of real question/answer records (``data --source cmedqa2``,
``webmedqa``, ``huatuo26m``...). The model answers every question greedily with the chat template,
on Ray Data generation actors (vLLM or HF ``generate``, as in ``sample``), and the answers are
scored against the references with :mod:`~huatuo_ray.eval.text_metrics` (character tokens by default).
Output: per set, an artifact of predictions (``meta.prediction``, ``meta.reference``); and
``table.md`` / ``metrics.json`` shaped like the paper's table 2 (one row per set).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

from huatuo_ray import artifacts, storage
from huatuo_ray.config import ClusterConfig, ModelConfig, input_artifact, option, to_dict
from huatuo_ray.dialogue import encode_prompt
from huatuo_ray.eval.answers import generate_answers
from huatuo_ray.eval.text_metrics import METRICS, score_corpus
from huatuo_ray.inference.batch import EnginePool
from huatuo_ray.inference.generation import EngineConfig
from huatuo_ray.models.fetch import local_model_path


@dataclass
class BenchmarkSet:
    """One test set."""

    name: str = option(help="name in the table, e.g. cMedQA2")
    path: str = input_artifact("dialogue artifact of question/answer records", made_by="data")


@dataclass
class BenchmarkConfig:
    """Zero-shot answers on QA test sets, with BLEU/GLEU/ROUGE/Distinct."""

    sets: list[BenchmarkSet] = option(help="test sets")
    output: str = option(help="folder for predictions, table.md and metrics.json")
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_new_tokens: int = option(256, help="longest answer")
    tokenization: Literal["char", "word"] = option("char", help="metric tokens (word: jieba)")
    limit: int | None = option(None, help="questions per set (None: all)")
    max_prompt_tokens: int = option(1024, help="longer questions are rejected")
    engines: int = option(1, help="generation engines (Ray Data actors)")
    gpus_per_engine: float = option(0, help="GPUs per engine")
    batch_size: int = option(16, help="questions per engine call")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def main(config: BenchmarkConfig) -> dict:
    from transformers import AutoTokenizer

    from huatuo_ray.runtime import connect

    connect(config.cluster, "benchmark")
    model_path = (
        os.path.abspath(config.model.path)
        if os.path.exists(config.model.path)
        else config.model.path
    )
    tokenizer = AutoTokenizer.from_pretrained(local_model_path(model_path))  # engines fetch too
    table: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    for test_set in config.sets:
        writer = artifacts.DatasetWriter(storage.join(config.output, test_set.name))
        rows = []
        for record in artifacts.read_dialogues(test_set.path):
            if record.turns[-1]["role"] != "assistant":
                writer.reject(record.id, "no reference answer")
                continue
            prompt = record.turns[:-1]
            ids = encode_prompt(tokenizer, prompt)
            if len(ids) > config.max_prompt_tokens:
                writer.reject(record.id, f"question of {len(ids)} tokens > max_prompt_tokens")
                continue
            meta = {"reference": record.turns[-1]["content"], "from_id": record.id}
            rows.append({"id": record.id, "source": "benchmark", "turns": prompt,
                         "meta": json.dumps(meta, ensure_ascii=False), "prompt_ids": ids, "seed": 0})  # fmt: skip
            if config.limit and len(rows) >= config.limit:
                break
        pool = EnginePool(config.engines, config.gpus_per_engine, config.batch_size)
        answered = generate_answers(rows, model_path, config.engine, config.max_new_tokens, pool)
        predictions, references = [], []
        for row in answered:
            meta = json.loads(row["meta"])
            predictions.append(meta["prediction"])
            references.append(meta["reference"])
            writer.write(
                {
                    **{k: row[k] for k in ("id", "source", "turns")},
                    "meta": json.dumps(meta, ensure_ascii=False),
                }
            )
        table[test_set.name] = score_corpus(predictions, references, config.tokenization)
        manifest = writer.finish("benchmark", to_dict(config), inputs=[artifacts.input_summary(test_set.path)],
                                 metrics=table[test_set.name])  # fmt: skip
        counts[test_set.name] = {
            "answered": manifest["rows"],
            "rejected": manifest["rejects"]["count"],
        }
    lines = ["| set | " + " | ".join(METRICS) + " |", "| --- |" + " --- |" * len(METRICS)]
    lines += [
        f"| {name} | " + " | ".join(f"{row[m]:.2f}" for m in METRICS) + " |"
        for name, row in table.items()
    ]
    summary = {
        "model": model_path,
        "tokenization": config.tokenization,
        "metrics": table,
        "counts": counts,
        "config": to_dict(config),
    }
    storage.write_bytes(storage.join(config.output, "table.md"), ("\n".join(lines) + "\n").encode())
    storage.write_json(storage.join(config.output, "metrics.json"), summary)
    return summary
