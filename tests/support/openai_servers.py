"""Loopback OpenAI-compatible servers for tests and benchmarks: scripted teacher, faulty proxy.

Why real HTTP and not a mocked client: the teacher client's job is to survive what real servers do
(429 with ``Retry-After``, 5xx, requests that hang past the time-out, connections closed without a
response, bodies that are not JSON or are cut short) without paying twice for the same answer. Those
behaviours live in the HTTP layer, so they are produced here by real servers on ``127.0.0.1`` and
observed through the real ``openai`` client.

* :class:`ScriptedOpenAIServer` answers ``POST /v1/chat/completions`` and ``GET /v1/models`` with
  real OpenAI JSON. Answers come from a ``responder(request_json) -> str`` callable. A fixed
  ``latency_s`` and a ``max_concurrency`` cap (requests beyond it queue, as in a real server) make
  throughput bounded by ``cap / latency``. :attr:`ScriptedOpenAIServer.stats` counts requests and
  how many times each distinct request was answered.
* :class:`FaultyProxy` sits in front of any OpenAI-compatible base URL (the scripted server or a
  real vLLM server) and, decided by a seeded :class:`random.Random`, answers some ``POST`` requests
  with a fault instead of forwarding them. :attr:`FaultyProxy.stats` counts faults, upstream calls
  and, per request fingerprint, the 200 responses delivered intact to the client.

Both run an aiohttp application on their own asyncio loop in a background thread, so synchronous
tests can use them with ``with ScriptedOpenAIServer() as server: ...`` and talk to ``base_url``.

Request identity: :func:`request_fingerprint` hashes the model, the messages and the sampling
parameters (every body field except transport-only ones such as ``stream`` or ``user``). Tests
assert "no request paid twice" by comparing per-fingerprint counts to 1.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

Responder = Callable[[dict[str, Any]], "str | ScriptedReply | Awaitable[str | ScriptedReply]"]


@dataclass(frozen=True)
class ScriptedReply:
    """A responder's answer beyond plain text: null ``content`` with ``finish_reason``
    ``content_filter`` (Azure's reply to filtered text), a ``refusal``, or a forced ``length``."""

    content: str | None
    finish_reason: str = "stop"
    refusal: str | None = None


# Body fields that change how a response is transported or attributed, not what it says.
_NON_SEMANTIC_KEYS = frozenset({"stream", "stream_options", "user", "metadata", "store"})

# Headers that belong to one hop of the connection and must not be copied by a proxy.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

FAULT_KINDS: tuple[str, ...] = ("429", "500", "hang", "drop", "garbage", "truncate")
"""Fault kinds of :class:`FaultyProxy`, in the order the seeded draw tests them."""

_SHUTDOWN_TIMEOUT_S = 0.5


# --------------------------------------------------------------------------------------- helpers


def request_fingerprint(body: Mapping[str, Any] | bytes) -> str:
    """A stable hash of what a chat request asks for: model, messages and sampling parameters.

    Transport-only fields (``stream``, ``stream_options``, ``user``, ``metadata``, ``store``) are
    left out, so the same question asked with and without streaming is the same request. Raw bytes
    are parsed as JSON first; bytes that are not a JSON object are hashed as they are.
    """
    if isinstance(body, (bytes, bytearray)):
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return hashlib.sha256(bytes(body)).hexdigest()
        if not isinstance(parsed, dict):
            return hashlib.sha256(bytes(body)).hexdigest()
        body = parsed
    canonical = {k: v for k, v in body.items() if k not in _NON_SEMANTIC_KEYS}
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def count_tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer: characters / 2, rounded up.

    Whitespace splitting would count a whole Chinese paragraph as one token; a character count
    works the same for every language and is good enough for usage accounting in tests.
    """
    return (len(text) + 1) // 2


def message_text(content: Any) -> str:
    """The text of a message ``content``: a string, or the ``text`` parts of a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def default_responder(request: dict[str, Any]) -> str:
    """Deterministic answer: a hash of the messages plus the start of the last user message.

    The same messages always give the same answer, different messages (almost surely) a different
    one, so tests can check answers were routed back to the right request.
    """
    messages = request.get("messages") or []
    digest = hashlib.sha256(
        json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()[:12]
    last_user = next(
        (message_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    return f"Scripted answer {digest}: {last_user[:80]}"


def openai_error_body(
    message: str, type_: str | None, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The JSON body OpenAI sends with an error status."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _json_response(
    status: int, payload: Any, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload, ensure_ascii=False).encode("utf-8"),
        content_type="application/json",
        headers=dict(headers or {}),
    )


class ScriptedHTTPError(Exception):
    """Raise from a responder to make :class:`ScriptedOpenAIServer` answer with an error status.

    Lets a test script server-side failures (e.g. the teacher itself returning 429 or 503 for one
    question) without a proxy in between.
    """

    def __init__(
        self,
        status: int,
        message: str = "scripted error",
        type_: str | None = "server_error",
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type_ = type_
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


# ------------------------------------------------------------------------------- loopback base


class _LoopbackService:
    """An aiohttp application on 127.0.0.1, served from its own event loop in a daemon thread.

    Subclasses build the application (:meth:`_make_app`) and may open resources on the loop
    (:meth:`_on_start` / :meth:`_on_stop`). The port is bound before the thread starts, so
    ``base_url`` is known as soon as :meth:`start` returns.
    """

    #: Cancel a request handler when its client goes away (aiohttp's default is not to).
    _handler_cancellation = False

    def __init__(self, host: str = "127.0.0.1", port: int = 0, base_path: str = "/v1") -> None:
        self.host = host
        self._requested_port = port
        self._base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # -- public API

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT`` with no path."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL to give a client, e.g. ``http://127.0.0.1:PORT/v1``."""
        return self.origin + self._base_path

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> _LoopbackService:
        """Bind a port, start the loop thread and return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        sock.listen(1024)
        sock.setblocking(False)
        self._port = sock.getsockname()[1]

        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        async def setup() -> None:
            await self._on_start()
            runner = web.AppRunner(
                self._make_app(),
                access_log=None,
                shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
                handler_cancellation=self._handler_cancellation,
            )
            await runner.setup()
            await web.SockSite(runner, sock).start()
            self._runner = runner

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(setup())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name=type(self).__name__, daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            sock.close()
            raise RuntimeError(f"{type(self).__name__} failed to start") from failure[0]
        return self

    def stop(self) -> None:
        """Stop serving (in-flight handlers get half a second to finish) and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return

        async def teardown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
            await self._on_stop()

        try:
            asyncio.run_coroutine_threadsafe(teardown(), loop).result(
                timeout=_SHUTDOWN_TIMEOUT_S + 10
            )
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._thread = self._loop = None

    def __enter__(self) -> _LoopbackService:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- for subclasses

    def _make_app(self) -> web.Application:
        raise NotImplementedError

    async def _on_start(self) -> None:
        """Runs on the service loop before the socket starts accepting connections."""

    async def _on_stop(self) -> None:
        """Runs on the service loop after the server stopped."""


# ------------------------------------------------------------------------------ scripted server


@dataclass(frozen=True)
class ServerStats:
    """A snapshot of :class:`ScriptedOpenAIServer` counters.

    ``total`` counts every chat-completions request that arrived; ``succeeded`` those answered with
    200; ``by_status`` every response status; ``max_concurrency`` the most requests being served
    at once (inside the cap); ``max_in_flight`` the most requests arrived and not yet answered
    (served plus queued); ``answered`` how many times each request fingerprint was answered with
    200. A request whose client went away before the answer was written still counts as answered:
    a real teacher would have charged for it.
    """

    total: int = 0
    succeeded: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    max_concurrency: int = 0
    max_in_flight: int = 0
    answered: dict[str, int] = field(default_factory=dict)
    first_answer_time: float | None = None  # time.perf_counter() of the first 200 answer
    last_answer_time: float | None = None

    @property
    def distinct_answered(self) -> int:
        """How many distinct requests were answered at least once."""
        return len(self.answered)

    @property
    def answered_more_than_once(self) -> dict[str, int]:
        """Fingerprints answered (paid for) more than once, with their counts."""
        return {key: n for key, n in self.answered.items() if n > 1}


class ScriptedOpenAIServer(_LoopbackService):
    """An OpenAI-compatible chat-completions server with scripted answers, on 127.0.0.1.

    Args:
        responder: ``responder(request_json) -> str`` (or an ``async`` function) giving the
            assistant message content. It runs on the server's loop thread, so keep it quick (use
            ``latency_s`` for delays). It may raise :class:`ScriptedHTTPError` to answer with an
            error status; any other exception becomes a 500.
        latency_s: fixed delay of every chat request, spent while holding a concurrency slot.
        max_concurrency: at most this many requests are served at once; the rest wait in arrival
            order, like a real server's queue. ``None`` means no cap.
        require_api_key: when set, requests whose ``Authorization`` header is not exactly
            ``Bearer <key>`` get 401.
        models: model ids listed by ``GET /v1/models``. The ``model`` of a completion echoes the
            request's.

    ``stream=true`` is refused with 400: the teacher client reads whole responses. ``n`` choices
    are returned (each the responder's answer); a ``max_tokens`` / ``max_completion_tokens`` smaller
    than the answer cuts it to ``2 * max_tokens`` characters with ``finish_reason="length"``.
    """

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        latency_s: float = 0.0,
        max_concurrency: int | None = None,
        require_api_key: str | None = None,
        models: Iterable[str] = ("scripted-teacher",),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port, base_path="/v1")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 or None")
        if latency_s < 0:
            raise ValueError("latency_s must be >= 0")
        self.responder: Responder = responder or default_responder
        self.latency_s = latency_s
        self.max_concurrency = max_concurrency
        self.require_api_key = require_api_key
        self.models = tuple(models)
        self._semaphore: asyncio.Semaphore | None = None
        self._reset_counters()

    # -- stats

    def _reset_counters(self) -> None:
        self._total = 0
        self._succeeded = 0
        self._by_status: Counter[int] = Counter()
        self._answered: Counter[str] = Counter()
        self._in_service = 0
        self._in_flight = 0
        self._max_concurrency = 0
        self._max_in_flight = 0
        self._first_answer: float | None = None
        self._last_answer: float | None = None

    @property
    def stats(self) -> ServerStats:
        """A consistent snapshot of the counters (safe to read from any thread)."""
        with self._lock:
            return ServerStats(
                total=self._total,
                succeeded=self._succeeded,
                by_status=dict(self._by_status),
                max_concurrency=self._max_concurrency,
                max_in_flight=self._max_in_flight,
                answered=dict(self._answered),
                first_answer_time=self._first_answer,
                last_answer_time=self._last_answer,
            )

    def reset_stats(self) -> None:
        """Zero the counters (requests in flight keep being tracked)."""
        with self._lock:
            in_service, in_flight = self._in_service, self._in_flight
            self._reset_counters()
            self._in_service, self._in_flight = in_service, in_flight

    def _record_status(self, status: int, key: str | None = None) -> None:
        with self._lock:
            self._by_status[status] += 1
            if status == 200 and key is not None:
                self._succeeded += 1
                self._answered[key] += 1
                now = time.perf_counter()
                self._first_answer = self._first_answer or now
                self._last_answer = now

    # -- application

    async def _on_start(self) -> None:
        if self.max_concurrency is not None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._list_models)
        return app

    def _authorized(self, request: web.Request) -> bool:
        if self.require_api_key is None:
            return True
        return request.headers.get("Authorization") == f"Bearer {self.require_api_key}"

    @staticmethod
    def _unauthorized() -> web.Response:
        return _json_response(
            401,
            openai_error_body(
                "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            ),
        )

    async def _list_models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        created = int(time.time())
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "huatuo-ray-testing"}
            for m in self.models
        ]
        return _json_response(200, {"object": "list", "data": data})

    async def _chat_completions(self, request: web.Request) -> web.Response:
        with self._lock:
            self._total += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        status = 500
        key: str | None = None
        try:
            response, key = await self._answer(request)
            status = response.status
            return response
        finally:
            with self._lock:
                self._in_flight -= 1
            self._record_status(status, key)

    async def _answer(self, request: web.Request) -> tuple[web.Response, str | None]:
        if not self._authorized(request):
            return self._unauthorized(), None
        try:
            body = await request.json()
        except ValueError:
            return _json_response(
                400, openai_error_body("Request body is not valid JSON.", "invalid_request_error")
            ), None
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return _json_response(
                400,
                openai_error_body(
                    "'messages' must be a non-empty list.", "invalid_request_error", "invalid_value"
                ),
            ), None
        if body.get("stream"):
            return _json_response(
                400,
                openai_error_body(
                    "ScriptedOpenAIServer does not stream; send stream=false.",
                    "invalid_request_error",
                ),
            ), None

        if (refused := self._check(body, request)) is not None:
            return refused, None
        if self._semaphore is None:
            contents = await self._serve(body)
        else:
            async with self._semaphore:
                contents = await self._serve(body)
        if isinstance(contents, web.Response):
            return contents, None
        response = _json_response(200, self._completion(body, contents), self._headers(body))
        return response, request_fingerprint(body)

    def _check(self, body: dict[str, Any], request: web.Request) -> web.Response | None:
        """A subclass's error answer to a request a real API would refuse (None: serve it)."""
        return None

    def _headers(self, body: dict[str, Any]) -> dict[str, str]:
        """Extra headers of a 200 answer (a subclass sends rate-limit headers here)."""
        return {}

    async def _serve(self, body: dict[str, Any]) -> list[str | ScriptedReply] | web.Response:
        """Hold one concurrency slot: wait ``latency_s``, then ask the responder for answers."""
        with self._lock:
            self._in_service += 1
            self._max_concurrency = max(self._max_concurrency, self._in_service)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            n = int(body.get("n") or 1)
            contents = []
            for _ in range(n):
                answer = self.responder(body)
                if inspect.isawaitable(answer):
                    answer = await answer
                contents.append(answer if isinstance(answer, ScriptedReply) else str(answer))
            return contents
        except ScriptedHTTPError as exc:
            return _json_response(
                exc.status,
                openai_error_body(exc.message, exc.type_, exc.code, exc.param),
                exc.headers,
            )
        except Exception as exc:  # a broken responder is a server error, as on a real server
            log.exception("responder failed")
            return _json_response(
                500, openai_error_body(f"responder failed: {exc}", "server_error")
            )
        finally:
            with self._lock:
                self._in_service -= 1

    @staticmethod
    def _completion(body: dict[str, Any], contents: list[str | ScriptedReply]) -> dict[str, Any]:
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        choices = []
        completion_tokens = 0
        for index, answer in enumerate(contents):
            reply = answer if isinstance(answer, ScriptedReply) else ScriptedReply(answer)
            content, finish_reason = reply.content, reply.finish_reason
            if content is not None and max_tokens is not None:
                if count_tokens(content) > int(max_tokens):
                    content = content[: 2 * int(max_tokens)]
                    finish_reason = "length"
            completion_tokens += count_tokens(content or "")
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": content, "refusal": reply.refusal},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            )
        prompt_tokens = sum(count_tokens(message_text(m.get("content"))) for m in body["messages"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "scripted-teacher"),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


# --------------------------------------------------------------------------------- faulty proxy


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of :class:`FaultyProxy` counters.

    ``total``: requests received. ``faults``: injected faults by kind (every kind present).
    ``forwarded``: requests sent upstream (including those later truncated). ``upstream_ok``:
    upstream 200 answers to POSTs — what the teacher answered, and charged for.
    ``upstream_errors``: upstream unreachable or timed out (the client got 502). ``delivered_ok``:
    200 answers to POSTs delivered intact to the client. ``by_status``: statuses sent to clients.
    ``upstream_ok_by_key`` / ``delivered_ok_by_key``: the same two counts per request fingerprint.
    """

    total: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    forwarded: int = 0
    upstream_ok: int = 0
    upstream_errors: int = 0
    delivered_ok: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    upstream_ok_by_key: dict[str, int] = field(default_factory=dict)
    delivered_ok_by_key: dict[str, int] = field(default_factory=dict)

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())

    @property
    def delivered_more_than_once(self) -> dict[str, int]:
        """Fingerprints delivered intact more than once: answers the client received twice."""
        return {key: n for key, n in self.delivered_ok_by_key.items() if n > 1}


def _fault_probabilities(
    fault_rate: float | None, fault_kinds: Iterable[str], explicit: Mapping[str, float | None]
) -> dict[str, float]:
    """Resolve ``fault_rate`` (split evenly over ``fault_kinds``) and per-kind ``p_*`` values."""
    kinds = tuple(fault_kinds)
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
    given = {kind: p for kind, p in explicit.items() if p is not None}
    if fault_rate is not None and given:
        raise ValueError("give either fault_rate or per-kind p_* probabilities, not both")
    probs = dict.fromkeys(FAULT_KINDS, 0.0)
    if fault_rate is not None:
        if kinds:
            for kind in kinds:
                probs[kind] = fault_rate / len(kinds)
    else:
        probs.update(given)
    if any(p < 0 for p in probs.values()) or sum(probs.values()) > 1 + 1e-9:
        raise ValueError(f"fault probabilities must be >= 0 and sum to <= 1, got {probs}")
    return probs


class FaultyProxy(_LoopbackService):
    """A seeded fault-injecting reverse proxy in front of an OpenAI-compatible base URL.

    Every ``POST`` draws one number from ``random.Random(seed)``; by the per-kind probabilities
    (tested in :data:`FAULT_KINDS` order) the request is either forwarded faithfully or answered
    with one fault:

    * ``429``: status 429, ``Retry-After: <retry_after_s>`` and an OpenAI rate-limit error body;
    * ``500``: status 500 with an OpenAI server-error body;
    * ``hang``: no answer for ``hang_s`` (set it longer than the client's time-out), then the
      connection is closed; if the client gives up first the hang ends with it;
    * ``drop``: the connection is closed without any response;
    * ``garbage``: status 200, ``Content-Type: application/json``, a body that is not JSON;
    * ``truncate``: the request IS forwarded (the upstream answers, and would charge), but the
      client gets only the first half of the body, with a Content-Length matching that half.

    ``GET`` requests (``/v1/models``) are always forwarded, so health checks see the upstream.
    With many concurrent requests the draws follow arrival order, so the fault sequence is
    reproducible per seed but which request gets which fault may vary between runs.

    Args:
        upstream_base_url: e.g. ``server.base_url`` or ``http://gpu-node:8000/v1``. The proxy
            mirrors its path: ``proxy.base_url`` is ``http://127.0.0.1:PORT/v1`` for it.
        seed: seed of the fault draws.
        fault_rate: convenience; splits evenly over ``fault_kinds`` (default: all six kinds).
            Not combinable with ``p_*``.
        p_429, p_500, p_hang, p_drop, p_garbage, p_truncate: per-kind probabilities.
        retry_after_s: value of the ``Retry-After`` header of injected 429s.
        hang_s: how long a ``hang`` lasts.
        upstream_timeout_s: total time-out of one upstream call; on failure the client gets 502.
    """

    _handler_cancellation = True  # a client that gave up ends its hang or upstream call

    def __init__(
        self,
        upstream_base_url: str,
        *,
        seed: int = 0,
        fault_rate: float | None = None,
        fault_kinds: Iterable[str] = FAULT_KINDS,
        p_429: float | None = None,
        p_500: float | None = None,
        p_hang: float | None = None,
        p_drop: float | None = None,
        p_garbage: float | None = None,
        p_truncate: float | None = None,
        retry_after_s: float = 0.2,
        hang_s: float = 30.0,
        upstream_timeout_s: float = 600.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        parts = urlsplit(upstream_base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"upstream_base_url must be an http(s) URL, got {upstream_base_url!r}")
        super().__init__(host=host, port=port, base_path=parts.path)
        self.upstream_origin = f"{parts.scheme}://{parts.netloc}"
        self.seed = seed
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.upstream_timeout_s = upstream_timeout_s
        self._rng = random.Random(seed)
        self.probabilities = _fault_probabilities(
            fault_rate,
            fault_kinds,
            {
                "429": p_429,
                "500": p_500,
                "hang": p_hang,
                "drop": p_drop,
                "garbage": p_garbage,
                "truncate": p_truncate,
            },
        )
        self._session: aiohttp.ClientSession | None = None
        self._reset_counters()

    def set_faults(
        self,
        *,
        fault_rate: float | None = None,
        fault_kinds: Iterable[str] = FAULT_KINDS,
        **p: float,
    ) -> None:
        """Change the fault probabilities while running, e.g. ``set_faults(fault_rate=0)``.

        Keyword names are those of the constructor: ``p_429``, ``p_500``, ``p_hang``, ``p_drop``,
        ``p_garbage``, ``p_truncate``; kinds not named get 0. The seeded draw sequence continues.
        """
        explicit: dict[str, float | None] = {}
        for name, value in p.items():
            kind = name.removeprefix("p_")
            if not name.startswith("p_") or kind not in FAULT_KINDS:
                raise TypeError(f"unknown fault probability {name!r}")
            explicit[kind] = value
        probabilities = _fault_probabilities(fault_rate, fault_kinds, explicit)
        with self._lock:
            self.probabilities = probabilities

    # -- stats

    def _reset_counters(self) -> None:
        self._total = 0
        self._faults: Counter[str] = Counter()
        self._forwarded = 0
        self._upstream_ok = 0
        self._upstream_errors = 0
        self._delivered_ok = 0
        self._by_status: Counter[int] = Counter()
        self._upstream_ok_by_key: Counter[str] = Counter()
        self._delivered_ok_by_key: Counter[str] = Counter()

    @property
    def stats(self) -> ProxyStats:
        """A consistent snapshot of the counters (safe to read from any thread)."""
        with self._lock:
            return ProxyStats(
                total=self._total,
                faults={kind: self._faults[kind] for kind in FAULT_KINDS},
                forwarded=self._forwarded,
                upstream_ok=self._upstream_ok,
                upstream_errors=self._upstream_errors,
                delivered_ok=self._delivered_ok,
                by_status=dict(self._by_status),
                upstream_ok_by_key=dict(self._upstream_ok_by_key),
                delivered_ok_by_key=dict(self._delivered_ok_by_key),
            )

    def reset_stats(self) -> None:
        """Zero the counters (the seeded draw sequence is not reset)."""
        with self._lock:
            self._reset_counters()

    # -- application

    async def _on_start(self) -> None:
        self._session = aiohttp.ClientSession(
            # Forward bodies byte for byte; an encoded body keeps its Content-Encoding header.
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=self.upstream_timeout_s),
            connector=aiohttp.TCPConnector(limit=0),  # the proxy must not add its own queue
        )

    async def _on_stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def _draw_fault(self) -> str | None:
        with self._lock:
            x = self._rng.random()
            edge = 0.0
            for kind in FAULT_KINDS:
                p = self.probabilities[kind]
                edge += p
                if p > 0 and x < edge:
                    return kind
            return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        key = request_fingerprint(body)
        fault = self._draw_fault() if request.method == "POST" else None
        with self._lock:
            self._total += 1
            if fault is not None:
                self._faults[fault] += 1

        if fault == "429":
            return await self._send(
                request,
                _json_response(
                    429,
                    openai_error_body(
                        "Rate limit reached (injected by FaultyProxy).",
                        "requests",
                        "rate_limit_exceeded",
                    ),
                    {"Retry-After": f"{self.retry_after_s:g}"},
                ),
            )
        if fault == "500":
            return await self._send(
                request,
                _json_response(
                    500,
                    openai_error_body(
                        "The server had an error while processing your request "
                        "(injected by FaultyProxy).",
                        "server_error",
                    ),
                ),
            )
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
            return await self._drop(request)
        if fault == "drop":
            return await self._drop(request)
        if fault == "garbage":
            return await self._send(
                request,
                web.Response(
                    status=200,
                    body=b"<html><body>not JSON (garbage injected by FaultyProxy)</body></html>",
                    headers={"Content-Type": "application/json"},
                ),
            )

        upstream = await self._forward(request, body, key)
        if fault == "truncate" and upstream.body is not None:
            full = bytes(upstream.body)  # type: ignore[arg-type]
            # A new Response computes Content-Length from the half body: HTTP stays valid, the
            # JSON does not.
            upstream = web.Response(
                status=upstream.status, body=full[: len(full) // 2], headers=upstream.headers
            )
            return await self._send(request, upstream)
        # Only POSTs (completions) are requests a teacher charges for; GET /v1/models is not one.
        return await self._send(
            request, upstream, deliver_key=key if request.method == "POST" else None
        )

    async def _forward(self, request: web.Request, body: bytes, key: str) -> web.Response:
        """Send the request upstream and build the response to relay (502 if upstream failed)."""
        assert self._session is not None
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() not in _HOP_BY_HOP and name.lower() != "accept-encoding"
        }
        url = self.upstream_origin + str(request.rel_url)
        with self._lock:
            self._forwarded += 1
        try:
            async with self._session.request(
                request.method, url, data=body, headers=headers, allow_redirects=False
            ) as upstream:
                payload = await upstream.read()
                status = upstream.status
                relay_headers = {
                    name: value
                    for name, value in upstream.headers.items()
                    if name.lower() not in _HOP_BY_HOP
                }
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            with self._lock:
                self._upstream_errors += 1
            return _json_response(
                502,
                openai_error_body(
                    f"FaultyProxy could not reach upstream: {type(exc).__name__}: {exc}",
                    "server_error",
                ),
            )
        if status == 200 and request.method == "POST":
            with self._lock:
                self._upstream_ok += 1
                self._upstream_ok_by_key[key] += 1
        return web.Response(status=status, body=payload, headers=relay_headers)

    async def _send(
        self, request: web.Request, response: web.Response, deliver_key: str | None = None
    ) -> web.StreamResponse:
        """Write ``response`` now, so that a failed write is known and not counted as delivered.

        The counters move before the write (a client that has its answer must already see it
        counted) and move back if the write fails or the client leaves meanwhile.
        """
        delivered = deliver_key is not None and response.status == 200
        self._count_sent(response.status, deliver_key if delivered else None, +1)
        try:
            await response.prepare(request)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:
            self._count_sent(response.status, deliver_key if delivered else None, -1)
            if isinstance(exc, asyncio.CancelledError):
                raise
        return response

    def _count_sent(self, status: int, deliver_key: str | None, step: int) -> None:
        with self._lock:
            self._by_status[status] += step
            if deliver_key is not None:
                self._delivered_ok += step
                self._delivered_ok_by_key[deliver_key] += step
                if self._delivered_ok_by_key[deliver_key] <= 0:
                    del self._delivered_ok_by_key[deliver_key]
            if self._by_status[status] <= 0:
                del self._by_status[status]

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        """Close the connection without a response.

        Closing the transport makes aiohttp cancel this handler (``handler_cancellation``), so
        nothing is ever written; the wait below is only a safety net.
        """
        if request.transport is not None:
            request.transport.close()
        await asyncio.sleep(5)
        return web.Response(status=599)
