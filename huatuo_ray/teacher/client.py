"""The teacher client: the ``openai`` package's async client, made fit for a paid API at scale.

What it adds to a bare ``chat.completions.create``:

* bounded concurrency per worker, and the job-wide RPM/TPM limits of a :mod:`limiter`;
* retries with jittered exponential back-off on 429 (honouring ``Retry-After``), 5xx, time-outs,
  dropped connections and unreadable bodies; other 4xx fail at once (retrying cannot help);
* the response cache: an answer is paid for once, and a rerun replays it;
* usage and cost accounting, counted per outcome.

The API key is read from the environment variable the config names. It never appears in a log
line, a cache entry, a manifest or an exception raised from here (:class:`TeacherError` messages
are built from the error class and status only).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

from huatuo_ray.config import TeacherConfig
from huatuo_ray.teacher.cache import ResponseCache, request_key
from huatuo_ray.teacher.limiter import Limiter

log = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """A request that failed for good (retries spent, or an error retrying cannot fix)."""


@dataclass
class TeacherAnswer:
    text: str
    key: str  # the request's cache key
    cached: bool  # replayed from the cache: not paid for now
    attempts: int  # HTTP tries made now (0 when cached)
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str = "stop"  # "length": cut at max_tokens


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


# The usage of the record a task works on: set per asyncio task by the Ray Data mapper.
RECORD_USAGE: ContextVar[Usage | None] = ContextVar("record_usage", default=None)


def api_key(config: TeacherConfig) -> str:
    if not config.api_key_env:  # a local endpoint that checks no key (vLLM's server, ``serve``)
        return "no-key"
    key = os.environ.get(config.api_key_env)
    if not key:
        raise TeacherError(
            f"the teacher's API key is not set: export {config.api_key_env}=... (for a Ray job, "
            f"pass it in the runtime environment's env_vars)"
        )
    return key


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


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
        # The client's own retries are off: ours honour Retry-After, count, and share limits.
        self._client = openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key=api_key(config),
            max_retries=0,
            timeout=config.timeout_s,
        )
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._rng = random.Random(seed)

    def sampling(self, **overrides: Any) -> dict[str, Any]:
        params = {
            "temperature": self.config.temperature,
            "top_p": self.config.top_p,
            "max_tokens": self.config.max_tokens,
        }
        params.update(overrides)
        return params

    async def chat(
        self, messages: list[dict[str, str]], variant: int = 0, **sampling: Any
    ) -> TeacherAnswer:
        """Answer ``messages``. ``variant`` > 0 asks the same thing again as a new request with
        sampling seed ``variant`` (used when an answer did not parse)."""
        params = self.sampling(**sampling)
        if variant:
            # Asking again must be a new request on the wire too: a new sampling seed.
            params["seed"] = variant
        extra_body = params.pop("extra_body", None) or self.config.extra_body or None
        key = request_key(self.config.model, messages, {**params, "extra_body": extra_body})
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self._count(requests=1, cached=1)
            return TeacherAnswer(
                hit["text"], key, True, 0, hit.get("usage", {}), hit.get("finish_reason", "stop")
            )
        text, usage, finish, attempts = await self._call(messages, params, extra_body)
        if self.cache is not None:
            record = {"text": text, "usage": usage, "finish_reason": finish}
            self.cache.put(key, {**record, "model": self.config.model, "time": time.time()})
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        self._count(
            requests=1,
            paid=1,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=(
                prompt * self.config.price_input_per_1m
                + completion * self.config.price_output_per_1m
            )
            / 1e6,
        )
        return TeacherAnswer(text, key, False, attempts, usage, finish)

    def _backoff(self, attempt: int) -> float:
        base = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**attempt)
        return base * (0.5 + self._rng.random() / 2)  # "equal jitter": never zero, spread out

    async def _call(
        self, messages: list[dict[str, str]], params: dict[str, Any], extra_body: Any
    ) -> tuple[str, dict[str, int], str, int]:
        oa = self._openai
        estimate = sum(len(m["content"]) for m in messages) + int(params.get("max_tokens", 0))
        for attempt in range(self.config.max_retries + 1):
            if self.limiter is not None:
                await self.limiter.wait(estimate)
            async with self._slots:
                try:
                    resp = await self._client.chat.completions.create(
                        model=self.config.model,
                        messages=messages,
                        extra_body=extra_body,
                        **params,
                    )
                    text = resp.choices[0].message.content
                    if not isinstance(text, str):
                        raise ValueError("no message content")
                    usage = resp.usage.model_dump() if resp.usage else {}
                    usage = {k: v for k, v in usage.items() if isinstance(v, int)}
                    finish = resp.choices[0].finish_reason or "stop"
                    return text, usage, str(finish), attempt + 1
                except oa.RateLimitError as e:
                    kind, delay = "429", _retry_after(e) or self._backoff(attempt)
                except oa.APIStatusError as e:
                    if e.status_code < 500 and e.status_code not in (408, 409):
                        self._count_failure(f"{e.status_code}")
                        # 401/403 bodies can echo part of the key: their text is never kept.
                        said = "" if e.status_code in (401, 403) else f": {str(e.message)[:200]}"
                        raise TeacherError(
                            f"teacher answered HTTP {e.status_code} ({type(e).__name__}); "
                            f"not retried{said}"
                        ) from None
                    kind, delay = str(e.status_code), self._backoff(attempt)
                except oa.APITimeoutError:
                    kind, delay = "timeout", self._backoff(attempt)
                except oa.APIConnectionError:
                    kind, delay = "connection", self._backoff(attempt)
                except (oa.APIResponseValidationError, ValueError, TypeError, AttributeError,
                        IndexError, KeyError):  # fmt: skip
                    kind, delay = "unreadable", self._backoff(attempt)
            self._count(errors={kind: 1})
            if attempt < self.config.max_retries:
                self._count(retries=1)
                log.debug("teacher %s; retry %d in %.2fs", kind, attempt + 1, delay)
                await asyncio.sleep(delay)
        self._count(failed=1)
        raise TeacherError(f"teacher request failed after {self.config.max_retries + 1} tries")

    def _count_failure(self, kind: str) -> None:
        self._count(failed=1, errors={kind: 1})

    def _count(self, **counts: Any) -> None:
        """Add to this client's totals and to the usage of the record being worked on, if any
        (records of one worker run concurrently; each has its own :data:`RECORD_USAGE`)."""
        self.usage.add(counts)
        if (record := RECORD_USAGE.get()) is not None:
            record.add(counts)

    async def close(self) -> None:
        await self._client.close()
