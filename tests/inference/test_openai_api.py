"""The OpenAI chat API layer on its own (no Ray, no vLLM): the key check, request parsing and its
400s, and the exact server-sent events of a streamed answer from a scripted engine whose pieces
are known, so every chunk and the usage are checked by hand. (The same layer over real vLLM and
Ray Serve, through HTTP: test_serve.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from huatuo_ray.dialogue import encode_prompt
from huatuo_ray.inference.engines import Delta
from huatuo_ray.inference.generation import SamplingConfig
from huatuo_ray.inference.openai_api import (
    APIError,
    ChatLimits,
    ChatService,
    check_key,
    key_digest,
    parse_chat,
)

ASK = [{"role": "user", "content": "头痛怎么办？"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class ScriptedEngine:
    """An engine that answers every request with the same pieces (a test double)."""

    def __init__(self, pieces: list[Delta]):
        self.pieces, self.seen = pieces, []

    async def stream(
        self, prompt: list[int], sampling: SamplingConfig, seed: int, request_id: str
    ) -> AsyncIterator[Delta]:
        self.seen.append((prompt, sampling, seed))
        for piece in self.pieces:
            yield piece

    def running(self) -> int:
        return 0


def test_key_check() -> None:
    digest = key_digest("sk-right")
    check_key("Bearer sk-right", digest)
    check_key("bearer  sk-right ", digest)
    check_key(None, None)  # no key configured: open
    for header in (None, "", "Bearer", "Basic sk-right", "Bearer sk-wrong", "sk-right"):
        with pytest.raises(APIError) as e:
            check_key(header, digest)
        assert e.value.status == 401 and e.value.body()["error"]["code"] == "invalid_api_key"
    assert "sk-right" not in digest


def test_parse_chat_builds_the_training_prompt_and_refuses_with_400s(tokenizer) -> None:
    limits = ChatLimits(max_messages=4, max_prompt_tokens=64, max_new_tokens=32, max_n=2)
    body = {"messages": [{"role": "developer", "content": "你是医生。"},
                         {"role": "user", "content": [{"type": "text", "text": "头痛"},
                                                      {"type": "text", "text": "怎么办？"}]}],
            "max_completion_tokens": 20, "seed": 2**40 + 5, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    req = parse_chat(body, tokenizer, "tiny", limits)
    turns = [
        {"role": "system", "content": "你是医生。"},
        {"role": "user", "content": "头痛怎么办？"},
    ]
    assert req.prompt == encode_prompt(tokenizer, turns)  # exactly as in training
    assert (req.sampling.max_new_tokens, req.sampling.n, req.seed) == (20, 2, 5)
    assert req.stream and req.include_usage
    assert parse_chat({"messages": ASK}, tokenizer, "tiny", limits).sampling.max_new_tokens == 32

    refused = {
        "model": ({"model": "gpt-4", "messages": ASK}, 404),
        "max_tokens": ({"messages": ASK, "max_tokens": 33}, 400),
        "n": ({"messages": ASK, "n": 3}, 400),
        "temperature": ({"messages": ASK, "temperature": 2.5}, 400),
        "messages": ({"messages": ASK * 5}, 400),
        "messages[0].role": ({"messages": [{"role": "tool", "content": "x"}]}, 400),
        "messages[0].content": ({"messages": [{"role": "user", "content": None}]}, 400),
    }
    for param, (bad, status) in refused.items():
        with pytest.raises(APIError) as e:
            parse_chat(bad, tokenizer, "tiny", limits)
        assert (e.value.param, e.value.status) == (param, status), bad
    with pytest.raises(APIError, match="context of 40"):
        parse_chat({"messages": ASK, "max_tokens": 32}, tokenizer, "tiny", limits, context=40)


def test_streamed_events_are_openais_and_match_the_whole_answer(tokenizer) -> None:
    pieces = [Delta(0, "多喝", 2, None), Delta(0, "水。", 2, None), Delta(0, "", 1, "stop")]
    service = ChatService(ScriptedEngine(pieces), tokenizer, "tiny", ChatLimits())
    body = {"messages": ASK, "seed": 3, "stream": True, "stream_options": {"include_usage": True}}

    async def collect() -> list[str]:
        return [e async for e in service.events(service.request(body))]

    events = asyncio.run(collect())
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    prompt = len(encode_prompt(tokenizer, ASK))
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]] == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "多喝"}, None),
        ({"content": "水。"}, None),
        ({}, "stop"),
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": prompt, "completion_tokens": 5,
                                   "total_tokens": prompt + 5}  # fmt: skip
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and all(c["usage"] is None for c in chunks[:-1])

    whole = asyncio.run(service.complete(service.request({**body, "stream": False})))
    assert whole["choices"][0]["message"]["content"] == "多喝水。"
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"] == chunks[-1]["usage"]
    assert service.requests["ok"] == 2
