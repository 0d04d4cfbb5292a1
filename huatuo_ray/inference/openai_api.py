"""The OpenAI chat API over an :class:`~huatuo_ray.inference.engines.AsyncEngine`, as an ASGI app.

One app serves both ways a model becomes an endpoint: a Ray Serve replica (stage ``serve``) and a
plain Ray actor (:mod:`~huatuo_ray.inference.server_actor`, e.g. ``consult``'s doctor).

* ``POST /v1/chat/completions``: with ``stream: true`` the answer arrives as server-sent events the
  way OpenAI sends them (``data: {chunk}`` blocks, a role chunk first, a chunk with the
  ``finish_reason``, the usage chunk when ``stream_options.include_usage`` is set, then
  ``data: [DONE]``); without, one ``chat.completion`` object.
* ``GET /v1/models``; ``GET /health`` (no key needed: readiness probes).
* Messages become a prompt exactly as in training (:func:`~huatuo_ray.dialogue.encode_prompt`).
* Every refusal is an :class:`APIError`, answered in OpenAI's error shape
  ``{"error": {"message", "type", "param", "code"}}`` with its status (400, 401, 404).
* With a key configured, every request but ``/health`` needs ``Authorization: Bearer <key>``; the
  server holds only the key's SHA-256 and compares digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import telemetry
from huatuo_ray.config import option
from huatuo_ray.inference.engines import AsyncEngine, Delta
from huatuo_ray.inference.generation import SamplingConfig

ROLES = {"system", "user", "assistant"}
ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


@dataclass
class ChatLimits:
    """What one request may ask; more gets HTTP 400 with a message."""

    max_messages: int = option(64, help="messages in one request")
    max_prompt_tokens: int = option(2048, help="prompt tokens (the whole rendered conversation)")
    max_new_tokens: int = option(512, help="cap on max_tokens, and its default")
    max_n: int = option(4, help="answers per request (n)")

    def __post_init__(self) -> None:
        if min(self.max_messages, self.max_prompt_tokens, self.max_new_tokens, self.max_n) < 1:
            raise ValueError("chat limits must be at least 1")


class APIError(Exception):
    """A refused request: HTTP ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


def key_digest(key: str) -> str:
    """What a server keeps of its API key (never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_key(authorization: str | None, digest: str | None) -> None:
    """401 unless ``authorization`` is ``Bearer <key>`` for the key of ``digest`` (None: open)."""
    if digest is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")  # fmt: skip
    if not hmac.compare_digest(key_digest(given.strip()), digest):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


@dataclass
class ChatRequest:
    prompt: list[int]
    sampling: SamplingConfig
    seed: int
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")


def turns_of(messages: Any, limits: ChatLimits) -> list[dict[str, str]]:
    """OpenAI messages -> the project's turns; 400 for what the chat template cannot render."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"{len(messages)} messages > the limit of {limits.max_messages}",
                       "messages")  # fmt: skip
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = ALIASES.get(m.get("role"), m.get("role"))
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role {m.get('role')!r} is not one of "
                           f"{sorted(ROLES)}", f"messages[{i}].role")  # fmt: skip
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            raise APIError(400, f"messages[{i}].content must be non-empty text",
                           f"messages[{i}].content")  # fmt: skip
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", "messages")
    return turns


def _number(body: dict[str, Any], name: str, default: Any, kind: type, low: float,
            high: float) -> Any:  # fmt: skip
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and value != int(value))
    ):
        raise APIError(400, f"{name} must be a number", name)
    if not low <= value <= high:
        raise APIError(400, f"{name}={value} is outside [{low}, {high}]", name)
    return kind(value)


def parse_chat(body: Any, tokenizer: Any, name: str, limits: ChatLimits,
               context: int | None = None) -> ChatRequest:  # fmt: skip
    """A request body -> prompt ids and sampling, or the APIError that refuses it."""
    from huatuo_ray.dialogue import encode_prompt

    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    if body.get("model") not in (None, name):
        raise APIError(404, f"model {body.get('model')!r} is not served here (try {name!r})",
                       "model", "model_not_found")  # fmt: skip
    prompt = encode_prompt(tokenizer, turns_of(body.get("messages"), limits))
    if len(prompt) > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(prompt)} tokens, more than the limit of "
                       f"{limits.max_prompt_tokens}", "messages", "context_length_exceeded")  # fmt: skip
    cap = limits.max_new_tokens
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    max_tokens = _number(body, "max_tokens", cap, int, 1, float("inf"))
    if max_tokens > cap:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's cap of {cap}",
                       "max_tokens")  # fmt: skip
    if context is not None and len(prompt) + max_tokens > context:
        raise APIError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) > the "
                       f"model's context of {context}", "messages", "context_length_exceeded")  # fmt: skip
    sampling = SamplingConfig(
        n=_number(body, "n", 1, int, 1, limits.max_n),
        temperature=_number(body, "temperature", 0.7, float, 0, 2),
        top_p=_number(body, "top_p", 1.0, float, 1e-6, 1),
        max_new_tokens=max_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)),  # vLLM's extension (benchmarks)
    )
    seed = _number(body, "seed", None, int, -(2**63), 2**63 - 1)
    options = body.get("stream_options") or {}
    return ChatRequest(
        prompt, sampling, uuid.uuid4().int % 2**31 if seed is None else seed % 2**31,
        stream=bool(body.get("stream")), include_usage=bool(options.get("include_usage")),
    )  # fmt: skip


class ChatService:
    """A model's chat API: the engine, its tokenizer, the limits and the key's digest.

    Exports ``huatuo_serve_requests`` (tag ``status``), ``huatuo_serve_completion_tokens``
    (its rate is tokens/s) and the gauge ``huatuo_serve_running`` (requests in the engine,
    running or queued), all tagged with ``stage`` and ``replica``.
    """

    def __init__(self, engine: AsyncEngine, tokenizer: Any, name: str, limits: ChatLimits,
                 key_sha256: str | None = None, context: int | None = None,
                 stage: str = "serve", replica: str = "0"):  # fmt: skip
        self.engine, self.tokenizer, self.name, self.limits = engine, tokenizer, name, limits
        self.key_sha256, self.context = key_sha256, context
        self.stage, self.replica = stage, replica
        self.requests: Counter[str] = Counter()  # by outcome, as exported

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                            "owned_by": "huatuo-ray"}]}  # fmt: skip

    def request(self, body: Any) -> ChatRequest:
        return parse_chat(body, self.tokenizer, self.name, self.limits, self.context)

    def _count(self, status: str, tokens: int = 0) -> None:
        self.requests[status] += 1
        tags = {"replica": self.replica}
        telemetry.count("serve_requests", 1, self.stage, status=status, **tags)
        telemetry.count("serve_completion_tokens", tokens, self.stage, **tags)
        telemetry.gauge("serve_running", self.engine.running(), self.stage, **tags)

    async def _deltas(self, req: ChatRequest) -> AsyncIterator[Delta]:
        telemetry.gauge("serve_running", self.engine.running() + 1, self.stage,
                        replica=self.replica)  # fmt: skip
        tokens, status = 0, "disconnected"
        try:
            async for d in self.engine.stream(req.prompt, req.sampling, req.seed, req.id):
                tokens += d.tokens
                yield d
            status = "ok"
        except Exception:
            status = "error"
            raise
        finally:
            self._count(status, tokens)

    def _usage(self, req: ChatRequest, completion: int) -> dict[str, int]:
        return {"prompt_tokens": len(req.prompt), "completion_tokens": completion,
                "total_tokens": len(req.prompt) + completion}  # fmt: skip

    async def complete(self, req: ChatRequest) -> dict[str, Any]:
        texts = [""] * req.sampling.n
        finish: list[str | None] = [None] * req.sampling.n
        completion = 0
        async for d in self._deltas(req):
            texts[d.index] += d.text
            finish[d.index] = d.finish_reason or finish[d.index]
            completion += d.tokens
        return {
            "id": req.id, "object": "chat.completion", "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish[i]}
                        for i, text in enumerate(texts)],
            "usage": self._usage(req, completion),
        }  # fmt: skip

    async def events(self, req: ChatRequest) -> AsyncIterator[str]:
        """Server-sent events of ``req``'s answer, as OpenAI streams them."""
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": req.id, "object": "chat.completion.chunk", "created": created,
                    "model": self.name, "choices": choices, **extra}  # fmt: skip
            if req.include_usage:
                body.setdefault("usage", None)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def choice(index: int, delta: dict[str, str], finish: str | None = None) -> dict:
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

        for i in range(req.sampling.n):
            yield chunk([choice(i, {"role": "assistant", "content": ""})])
        completion = 0
        try:
            async for d in self._deltas(req):
                completion += d.tokens
                if d.text:
                    yield chunk([choice(d.index, {"content": d.text})])
                if d.finish_reason:
                    yield chunk([choice(d.index, {}, d.finish_reason)])
        except Exception as e:  # noqa: BLE001 - the status line is sent: tell the client in-band
            yield f"data: {json.dumps(APIError(500, str(e), type='server_error').body())}\n\n"
            return
        if req.include_usage:
            yield chunk([], usage=self._usage(req, completion))
        yield "data: [DONE]\n\n"


def openai_app(service: ChatService) -> Any:
    """The Starlette app of ``service`` (for Ray Serve's ingress or uvicorn)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    def refused(e: APIError) -> JSONResponse:
        service._count(f"http_{e.status}")
        return JSONResponse(e.body(), status_code=e.status)

    async def models(request: Request) -> JSONResponse:
        try:
            check_key(request.headers.get("authorization"), service.key_sha256)
        except APIError as e:
            return refused(e)
        return JSONResponse(service.models())

    async def chat(request: Request) -> Any:
        try:
            check_key(request.headers.get("authorization"), service.key_sha256)
            try:
                body = await request.json()
            except ValueError:
                raise APIError(400, "the body is not valid JSON") from None
            req = service.request(body)
        except APIError as e:
            return refused(e)
        if req.stream:
            return StreamingResponse(service.events(req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        return JSONResponse(await service.complete(req))

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ])  # fmt: skip
