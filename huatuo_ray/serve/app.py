"""A trained model behind an OpenAI-compatible chat endpoint, as a Ray Serve deployment.

``POST /v1/chat/completions`` (non-streaming) and ``GET /v1/models``. Messages become a prompt
exactly as in training: :func:`~huatuo_ray.dialogue.encode_prompt` renders the turns with the
project's chat template, so a multi-turn history reaches the model the way SFT showed it one.
Each replica holds one generation engine (vLLM, or HF ``generate`` where vLLM is not installed)
and answers one request at a time; Serve spreads requests over ``replicas``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException
from ray import serve

from huatuo_ray.inference.generation import EngineConfig, SamplingConfig

api = FastAPI(title="huatuo-ray")
ROLES = {"system", "user", "assistant"}


def turns_of(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages -> the project's turns; 400 for what the chat template cannot render."""
    if not isinstance(messages, list) or not messages:
        raise HTTPException(400, "messages must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(content, str):
            raise HTTPException(400, f"messages[{i}]: need a role in {sorted(ROLES)} and text")
        turns.append({"role": m["role"], "content": content})
    if turns[-1]["role"] != "user":
        raise HTTPException(400, "the last message must be the user's")
    return turns


@serve.deployment
@serve.ingress(api)
class ChatServer:
    def __init__(self, model_path: str, name: str, engine: EngineConfig, max_new_tokens: int,
                 max_prompt_tokens: int):  # fmt: skip
        from transformers import AutoTokenizer

        from huatuo_ray.inference.generation import make_generator

        self.name, self.max_new_tokens = name, max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.generator = make_generator(model_path, engine)
        self.lock = asyncio.Lock()  # one generation at a time per replica

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "huatuo-ray"}]}  # fmt: skip

    @api.post("/v1/chat/completions")
    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        from huatuo_ray.dialogue import encode_prompt

        if body.get("stream"):
            raise HTTPException(400, "stream is not supported")
        if body.get("model") not in (None, self.name):
            raise HTTPException(404, f"model {body.get('model')!r} is not served here")
        ids = encode_prompt(self.tokenizer, turns_of(body.get("messages")))
        if len(ids) > self.max_prompt_tokens:
            raise HTTPException(400, f"prompt of {len(ids)} tokens > {self.max_prompt_tokens}")
        sampling = SamplingConfig(
            n=int(body.get("n") or 1),
            temperature=float(body.get("temperature", 0.7)),
            top_p=float(body.get("top_p", 1.0)),
            max_new_tokens=min(int(body.get("max_tokens") or self.max_new_tokens), self.max_new_tokens),
        )  # fmt: skip
        seed = int(body["seed"]) if body.get("seed") is not None else uuid.uuid4().int % 2**31
        async with self.lock:
            samples = (await asyncio.to_thread(self.generator.generate, [ids], sampling, [seed]))[0]
        completion = sum(len(s.token_ids) for s in samples)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": s.text},
                    "finish_reason": "stop" if s.finished else "length",
                }
                for i, s in enumerate(samples)
            ],  # fmt: skip
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": completion,
                "total_tokens": len(ids) + completion,
            },  # fmt: skip
        }
