"""Offline generation over dialogue rows on Ray Data: one engine per actor (vLLM, or HF
``generate``), used by ``sample`` (k responses per prompt), ``benchmark`` and ``judge`` (one
greedy answer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from huatuo_ray.inference.generation import EngineConfig, SamplingConfig, make_generator


class SampleBatch:
    """Ray Data callable: rows with ``prompt_ids`` and ``seed`` in; the same rows with
    ``meta.responses`` and ``meta.finished`` (one per sample) out."""

    def __init__(self, model_path: str, engine: EngineConfig, sampling: SamplingConfig):
        self.generator = make_generator(model_path, engine)
        self.sampling = sampling

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        prompts = [list(r["prompt_ids"]) for r in rows]
        seeds = [int(r["seed"]) for r in rows]
        outputs = self.generator.generate(prompts, self.sampling, seeds)
        for row, samples in zip(rows, outputs):
            meta = json.loads(row["meta"])
            meta["responses"] = [s.text for s in samples]
            meta["finished"] = [s.finished for s in samples]
            row["meta"] = json.dumps(meta, ensure_ascii=False)
            del row["prompt_ids"], row["seed"]
        return pa.Table.from_pylist(rows)


@dataclass
class EnginePool:
    """The Ray Data actors that generate: how many, GPUs each, rows per engine call."""

    engines: int = 1
    gpus_per_engine: float = 0
    batch_size: int = 16


Rows = list[dict[str, Any]]  # dialogue rows (Dialogue.to_row) with their prompt_ids and seed


def generate_rows(
    rows: Rows, model_path: str, engine: EngineConfig, sampling: SamplingConfig, pool: EnginePool
) -> Rows:
    """:class:`SampleBatch` over ``rows`` on the ``pool``'s actors; the rows back, sorted by id."""
    import pyarrow as pa
    import ray

    if not rows:
        return []
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # vLLM's engine in the actor's own process
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows)).map_batches(
        SampleBatch,
        fn_constructor_args=(model_path, engine, sampling),
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        concurrency=pool.engines,
        num_gpus=pool.gpus_per_engine,
        num_cpus=0.5 if not pool.gpus_per_engine else 1,
        runtime_env={"env_vars": env},
    )
    return sorted(ds.iter_rows(), key=lambda r: r["id"])
