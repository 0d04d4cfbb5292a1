"""The teacher client: the ``openai`` package's async client, made fit for a paid API at scale.

What it adds to a bare ``chat.completions.create``:

* bounded concurrency per worker, and the job-wide RPM/TPM limits of a :mod:`limiter`;
* the request shape each model accepts: ``max_tokens`` or ``max_completion_tokens``, sampling
  fields left out when null, ``reasoning_effort``; Azure OpenAI's deployments path and header;
* retries with jittered exponential back-off on 429 (honouring ``Retry-After``), 5xx, time-outs,
  dropped connections and unreadable bodies; other 4xx fail the record at once;
* errors that every request would meet again (a wrong key, an unknown model, a parameter the
  model refuses, an exhausted quota) raise :class:`TeacherFatalError` at the first occurrence,
  and every later call of the same client raises it too without a request: the stage stops;
* answers that carry no usable text (``content_filter``, a ``refusal``, null content) come back
  at once with that ``finish_reason``, not retried as unreadable (each retry would be paid);
* the rate-limit headers of every response pace the job's shared limiter;
* the response cache: an answer is paid for once, and a rerun replays it;
* a recording mode for the Batch API (:mod:`~huatuo_ray.teacher.batch`): requests not cached are
  noted, not sent, and failed batch lines fail their records with the service's reason;
* usage and cost accounting, counted per outcome.

The API key is read from the environment variable the config names. It never appears in a log
line, a cache entry, a manifest or an exception raised from here: error messages carry the
server's message with the key, and anything that looks like a piece of a key, taken out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

from huatuo_ray.config import TeacherConfig
from huatuo_ray.teacher.cache import ResponseCache, request_key
from huatuo_ray.teacher.limiter import Limiter, pacing_delay, retry_after

log = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """A request that failed for good (retries spent, or an error of this request only)."""


class TeacherFatalError(RuntimeError):
    """An error every request of the stage would meet again: it stops the stage.

    Not a :class:`TeacherError` on purpose: code that turns a failed request into a reject must
    let this one through, so that a wrong key does not become one reject per record.
    """


#: Error codes of a 400/429 that no retry and no other record can get past.
FATAL_CODES = frozenset(
    {"unsupported_parameter", "unsupported_value", "unknown_parameter", "insufficient_quota"}
)
#: Statuses that every request meets again: bad key, no access, unknown model or deployment,
#: DeepSeek's "insufficient balance".
FATAL_STATUSES = frozenset({401, 402, 403, 404})
#: ``finish_reason`` values of an answer with no usable text, asked again at most once.
BLOCKED = ("content_filter", "refusal", "empty")


@dataclass
class TeacherAnswer:
    text: str
    key: str  # the request's cache key
    cached: bool  # replayed from the cache: not paid for now
    attempts: int  # HTTP tries made now (0 when cached)
    usage: dict[str, int] = field(default_factory=dict)
    # "length": cut at max_tokens; "content_filter" / "refusal" / "empty": no usable text
    finish_reason: str = "stop"


@dataclass
class Usage:
    """Counters of one client; summed over workers into a stage's manifest."""

    requests: int = 0  # answers returned (paid now or cached)
    paid: int = 0  # successful HTTP calls made now
    cached: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    # tries that timed out and were asked again: the server may have answered (and billed) both
    possibly_paid_twice: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, other: Usage | dict[str, Any]) -> None:
        other = asdict(other) if isinstance(other, Usage) else other
        for name, value in other.items():
            if name == "errors":
                for kind, n in value.items():
                    self.errors[kind] = self.errors.get(kind, 0) + n
            else:
                setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cost_usd"] = round(out["cost_usd"], 6)
        return out


class NotCached(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a recording client (batch mode's collect pass) for a request not yet cached."""


def usage_counts(usage: dict[str, Any], config: TeacherConfig, discount: float = 0.0) -> dict:
    """Token counts and cost of one answer's ``usage``; prompt tokens the server says it read
    from its prompt cache are priced at ``price_cached_input_per_1m``; ``discount`` is a share
    off the whole (the Batch API's 50%)."""
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    details = usage.get("prompt_tokens_details") or {}
    cached = min(prompt, int(details.get("cached_tokens") or usage.get("cached_tokens") or 0))
    cached_price = config.price_cached_input_per_1m
    if cached_price is None:
        cached_price = config.price_input_per_1m
    cost = (
        (prompt - cached) * config.price_input_per_1m
        + cached * cached_price
        + completion * config.price_output_per_1m
    ) / 1e6
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd": cost * (1.0 - discount),
    }


# The usage of the record a task works on: set per asyncio task by the Ray Data mapper.
RECORD_USAGE: ContextVar[Usage | None] = ContextVar("record_usage", default=None)


def api_key(config: TeacherConfig) -> str:
    if not config.api_key_env:  # a local endpoint that checks no key (vLLM's server, ``serve``)
        return "no-key"
    key = os.environ.get(config.api_key_env)
    if not key:
        raise TeacherFatalError(
            f"the teacher's API key is not set: export {config.api_key_env}=... (for a Ray job, "
            f"pass it in the runtime environment's env_vars)"
        )
    return key


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    return retry_after(response.headers) if response is not None else None


def redact(text: str, key: str) -> str:
    """``text`` without the key or anything that looks like part of one (OpenAI's 401 echoes a
    masked key such as ``sk-abc***xyz``)."""
    if len(key) >= 4:
        text = text.replace(key, "[key]")
        for part in (key[:8], key[-6:]):
            if len(part) >= 4:
                text = text.replace(part, "[key]")
    text = re.sub(r"\S*\*{2,}\S*", "[key]", text)
    return re.sub(r"\b(sk|key)-[\w-]{4,}", "[key]", text)


def error_fields(exc: Any) -> tuple[str, str]:
    """(code, server message) of an HTTP error: OpenAI's ``{"error": {"message", "type",
    "param", "code"}}``, Azure's ``{"error": {"code", "message"}}``, or vLLM's bodies."""
    body = exc.body if isinstance(getattr(exc, "body", None), dict) else {}
    body = body.get("error", body) if isinstance(body.get("error"), dict) else body
    code = body.get("code") or body.get("type") or ""
    message = body.get("message") or body.get("detail") or ""
    return str(code), str(message)


def is_fatal(status: int, code: str, message: str) -> bool:
    """Whether every request would meet this error again (see :data:`FATAL_CODES`)."""
    if status in FATAL_STATUSES or code in FATAL_CODES:
        return True
    # OpenAI's older wording for an unknown field carries no code
    return status == 400 and message.startswith("Unrecognized request argument")


def make_client(config: TeacherConfig, key: str) -> Any:
    """The ``openai`` async client for the config's endpoint kind; its own retries are off
    (ours honour Retry-After, count, and share limits)."""
    import openai

    common = {"api_key": key, "max_retries": 0, "timeout": config.timeout_s}
    if config.api_kind == "azure":
        # POST {base_url}/openai/deployments/{model}/chat/completions?api-version=..., header
        # api-key: the deployment is the request's ``model``.
        return openai.AsyncAzureOpenAI(
            azure_endpoint=config.base_url, api_version=config.azure_api_version, **common
        )
    return openai.AsyncOpenAI(base_url=config.base_url, **common)


class TeacherClient:
    """One per worker process. ``await client.chat(messages)`` -> :class:`TeacherAnswer`."""

    def __init__(
        self,
        config: TeacherConfig,
        cache: ResponseCache | None = None,
        limiter: Limiter | None = None,
        seed: int = 0,
    ):
        import openai

        self.config, self.cache, self.limiter = config, cache, limiter
        self.usage = Usage()
        self._openai = openai
        self._key = api_key(config)
        self._client = make_client(config, self._key)
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._rng = random.Random(seed)
        self.fatal: TeacherFatalError | None = None  # set once: every later call raises it
        # Batch mode: requests that are not cached are noted here instead of asked (see
        # :mod:`~huatuo_ray.teacher.batch`), and batch lines that failed for good, by key.
        self.recording: list[tuple[str, int, dict[str, Any]]] | None = None
        self.refused: dict[str, str] = {}

    def sampling(self, **overrides: Any) -> dict[str, Any]:
        """The request's sampling fields: null ones left out, ``max_tokens`` under the field
        this model reads (an override ``max_tokens=N`` is moved there too)."""
        config = self.config
        params: dict[str, Any] = {"temperature": config.temperature, "top_p": config.top_p}
        params[config.tokens_field] = overrides.pop("max_tokens", config.max_tokens)
        if config.reasoning_effort:
            params["reasoning_effort"] = config.reasoning_effort
        params.update(overrides)
        return {k: v for k, v in params.items() if v is not None}

    def max_tokens(self, **overrides: Any) -> int:
        """The answer-length limit a request with these overrides carries."""
        return int(self.sampling(**overrides)[self.config.tokens_field])

    async def chat(
        self, messages: list[dict[str, str]], variant: int = 0, **sampling: Any
    ) -> TeacherAnswer:
        """Answer ``messages``. ``variant`` > 0 asks the same thing again as a new request with
        sampling seed from ``variant`` (used when an answer did not parse)."""
        if self.fatal is not None:
            raise self.fatal
        params = self.sampling(**sampling)
        if variant:
            # Asking again must be a new request on the wire too: a new sampling seed (derived
            # from the caller's own, when it gave one, so that retries of requests that differ
            # only by their seed stay apart).
            given = params.get("seed")
            params["seed"] = variant if given is None else (given * 1_000_003 + variant) % 2**31
        extra_body = params.pop("extra_body", None) or self.config.extra_body or None
        key = request_key(self.config.model, messages, {**params, "extra_body": extra_body})
        if self.cache is not None and (hit := await self.cache.aget(key)) is not None:
            self._count(requests=1, cached=1)
            return TeacherAnswer(
                hit["text"], key, True, 0, hit.get("usage", {}), hit.get("finish_reason", "stop")
            )
        if key in self.refused:  # a batch line that failed, configured to be a reject
            self._count_failure("batch")
            raise TeacherError(self.refused[key])
        if self.recording is not None:  # the batch mode's collect pass: note it, ask nothing
            body = {"model": self.config.model, "messages": messages, **params}
            self.recording.append((key, variant, {**body, **(extra_body or {})}))
            raise NotCached(key)
        text, usage, finish, attempts = await self._call(messages, params, extra_body)
        if self.cache is not None:
            record = {"text": text, "usage": usage, "finish_reason": finish}
            await self.cache.aput(key, {**record, "model": self.config.model, "time": time.time()})
        self._count(requests=1, paid=1, **usage_counts(usage, self.config))
        return TeacherAnswer(text, key, False, attempts, usage, finish)

    def _backoff(self, attempt: int) -> float:
        base = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**attempt)
        return base * (0.5 + self._rng.random() / 2)  # "equal jitter": never zero, spread out

    async def _call(
        self, messages: list[dict[str, str]], params: dict[str, Any], extra_body: Any
    ) -> tuple[str, dict[str, int], str, int]:
        oa = self._openai
        tokens = int(params.get(self.config.tokens_field, 0))
        estimate = sum(len(m["content"]) for m in messages) + tokens
        for attempt in range(self.config.max_retries + 1):
            if self.limiter is not None:
                await self.limiter.wait(estimate)
            async with self._slots:
                try:
                    raw = await self._client.chat.completions.with_raw_response.create(
                        model=self.config.model,
                        messages=messages,
                        extra_body=extra_body,
                        **params,
                    )
                    await self._pace(raw.headers, estimate)
                    text, usage, finish = _read_completion(raw.parse())
                    return text, usage, finish, attempt + 1
                except oa.APIStatusError as e:
                    await self._pace(e.response.headers, estimate)
                    self._raise_if_final(e)
                    kind = str(e.status_code)
                    delay = _retry_after(e) if e.status_code == 429 else None
                    delay = delay or self._backoff(attempt)
                except oa.APITimeoutError:
                    kind, delay = "timeout", self._backoff(attempt)
                except oa.APIConnectionError:
                    kind, delay = "connection", self._backoff(attempt)
                except (oa.APIResponseValidationError, ValueError, TypeError, AttributeError,
                        IndexError, KeyError):  # fmt: skip
                    kind, delay = "unreadable", self._backoff(attempt)
            self._count(errors={kind: 1})
            if attempt < self.config.max_retries:
                self._count(retries=1, possibly_paid_twice=int(kind == "timeout"))
                log.debug("teacher %s; retry %d in %.2fs", kind, attempt + 1, delay)
                await asyncio.sleep(delay)
        self._count(failed=1)
        raise TeacherError(f"teacher request failed after {self.config.max_retries + 1} tries")

    def _raise_if_final(self, e: Any) -> None:
        """Raise for an HTTP error that retrying cannot fix: fatal for the stage, or for this
        record; return for one worth retrying (429 without a quota code, 408, 409, 5xx)."""
        code, message = error_fields(e)
        status = e.status_code
        said = " ".join(redact(message, self._key).split())[:300] or type(e).__name__
        if is_fatal(status, code, message):
            self._count_failure(f"{status}")
            self.fatal = TeacherFatalError(
                f"the teacher {self.config.model!r} at {self.config.base_url} answered HTTP "
                f"{status}{f' ({code})' if code else ''}: {said}"
            )
            raise self.fatal from None
        if status < 500 and status not in (408, 409, 429):
            self._count_failure(f"{status}")
            raise TeacherError(
                f"teacher answered HTTP {status}{f' ({code})' if code else ''}; not retried: {said}"
            ) from None

    async def _pace(self, headers: Any, estimate: int) -> None:
        """Tell the shared limiter to hold every worker when the server says so."""
        if self.limiter is None:
            return
        hold = pacing_delay(headers, estimate)
        if hold:
            await self.limiter.hold(hold)

    def _count_failure(self, kind: str) -> None:
        self._count(failed=1, errors={kind: 1})

    def _count(self, **counts: Any) -> None:
        """Add to this client's totals and to the usage of the record being worked on, if any
        (records of one worker run concurrently; each has its own :data:`RECORD_USAGE`)."""
        self.usage.add(counts)
        if (record := RECORD_USAGE.get()) is not None:
            record.add(counts)

    async def flush(self) -> None:
        """Write the answers the cache still buffers."""
        if self.cache is not None:
            await self.cache.aflush()

    async def close(self) -> None:
        await self.flush()
        await self._client.close()


def _read_completion(resp: Any) -> tuple[str, dict[str, int], str]:
    """(text, usage, finish_reason) of a chat completion. An answer with no usable text comes
    back as ``""`` with finish_reason ``content_filter``, ``refusal`` or ``empty``; a body that
    is no completion at all raises (retried as unreadable)."""
    choice = resp.choices[0]
    message = choice.message
    usage = resp.usage.model_dump() if resp.usage else {}
    details = usage.get("prompt_tokens_details") or {}
    usage = {k: v for k, v in usage.items() if isinstance(v, int)}
    if details.get("cached_tokens"):  # priced lower: kept for the cost
        usage["cached_tokens"] = int(details["cached_tokens"])
    finish = str(choice.finish_reason or "stop")
    text = message.content
    if finish == "content_filter":
        return "", usage, "content_filter"
    if getattr(message, "refusal", None):
        return "", usage, "refusal"
    if not isinstance(text, str) or not text.strip():
        return "", usage, "empty"
    return text, usage, finish
