"""One vLLM import for the session's checks that vLLM loads what a stage wrote.

A check used to start vLLM's OpenAI server on the folder (two vLLM imports, ~14 s on 2 cores)
or a Ray task that imported vLLM again (~6 s). :class:`VLLMCheck` lives in one Ray actor for the
whole session (the ``vllm_check`` fixture): each check builds a real ``vllm.LLM`` on the folder
(with its own tokenizer and chat template, as the server does), uses it and lets it go; after the
first, a build takes under a second."""

from __future__ import annotations

import gc
from typing import Any

from huatuo_ray.inference.generation import EngineConfig, SamplingConfig, VLLMGenerator


class VLLMCheck:
    def chat(self, model_dir: str, messages: list[dict[str, str]], max_tokens: int) -> list[int]:
        """The tokens vLLM answers ``messages`` with, through the folder's chat template."""
        from vllm import SamplingParams

        engine = VLLMGenerator(model_dir, EngineConfig(backend="vllm", max_model_len=512))
        try:
            out = engine.llm.chat(messages, SamplingParams(max_tokens=max_tokens), use_tqdm=False)
            return list(out[0].outputs[0].token_ids)
        finally:
            _free(engine)

    def generate(
        self,
        model_dir: str,
        prompts: list[list[int]],
        samplings: list[SamplingConfig],
        seeds: list[int],
        max_model_len: int = 256,
    ) -> list[Any]:
        """``VLLMGenerator.generate`` of the prompts once per sampling, with log-probs."""
        engine = VLLMGenerator(model_dir, EngineConfig(backend="vllm", max_model_len=max_model_len))
        try:
            return [engine.generate(prompts, s, seeds, logprobs=True) for s in samplings]
        finally:
            _free(engine)


def _free(engine: VLLMGenerator) -> None:
    del engine.llm
    gc.collect()
