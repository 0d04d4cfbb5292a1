"""Requests-per-minute and tokens-per-minute limits shared by every worker of a job.

An API's limits hold for the whole key, not per process, so one :class:`RateLimiter` Ray actor
keeps the books for all workers. It uses the "virtual scheduling" form of a token bucket (GCRA):
each reservation moves a ``next free`` time forward by its cost, and the caller sleeps until its
slot; a burst of up to one second's worth of capacity passes at once. Workers talk to it through
:class:`RemoteLimiter`; in a single process :class:`LocalLimiter` does the same job.

The server knows the key's limits better than any config: OpenAI and Azure send
``x-ratelimit-remaining-requests/-tokens`` with ``x-ratelimit-reset-requests/-tokens`` on every
answer, and ``retry-after(-ms)`` with a 429. When they say the budget is spent,
:func:`pacing_delay` turns them into a pause that :meth:`Limiter.hold` puts on the shared books,
so every worker waits, not only the one that was told.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Protocol


class Limiter(Protocol):
    async def wait(self, tokens: int) -> None: ...

    async def hold(self, seconds: float) -> None: ...


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds of a reset header: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"`` (OpenAI's
    form) or a plain number of seconds; None when absent or unreadable."""
    if text is None:
        return None
    text = str(text).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def retry_after(headers: Any) -> float | None:
    """The wait a server asks for: ``retry-after-ms`` (OpenAI, Azure) or ``retry-after``."""
    ms = headers.get("retry-after-ms")
    if ms is not None and (value := parse_duration(ms)) is not None:
        return value / 1000
    return parse_duration(headers.get("retry-after"))


def pacing_delay(headers: Any, tokens: int) -> float:
    """How long every worker should hold off, from one response's headers (0: no need).

    The budget is spent when no request is left, or fewer tokens than one request needs
    (``tokens``); the wait is then the matching reset time. A ``retry-after`` counts as well.
    """
    delays = [retry_after(headers) or 0.0]
    for kind, need in (("requests", 1), ("tokens", tokens)):
        try:
            remaining = float(headers.get(f"x-ratelimit-remaining-{kind}"))
        except (TypeError, ValueError):
            continue
        if remaining < need:
            delays.append(parse_duration(headers.get(f"x-ratelimit-reset-{kind}")) or 1.0)
    return min(max(delays), 600.0)  # a broken header must not stall the job for hours


def _gcra(tat: float, now: float, cost: float, tolerance: float) -> tuple[float, float]:
    """(start time, new theoretical arrival time) of one reservation costing ``cost`` seconds."""
    tat = max(tat, now)
    return max(now, tat - tolerance), tat + cost


class _Books:
    """The arithmetic, shared by the local and the actor versions."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.tat_requests = self.tat_tokens = time.monotonic()
        self.hold_until = 0.0  # nobody starts before this (the server said so)
        self.reserved = 0

    def hold(self, seconds: float) -> None:
        self.hold_until = max(self.hold_until, time.monotonic() + seconds)

    def reserve(self, tokens: int) -> float:
        """Book one request of ``tokens``; return how long the caller must wait first."""
        now = time.monotonic()
        start = now
        if self.rpm:
            interval = 60.0 / self.rpm
            burst = max(1.0, self.rpm / 60.0)  # one second's worth of requests at once
            begin, self.tat_requests = _gcra(
                self.tat_requests, now, interval, (burst - 1) * interval
            )
            start = max(start, begin)
        if self.tpm:
            cost = 60.0 * max(tokens, 1) / self.tpm
            begin, self.tat_tokens = _gcra(self.tat_tokens, now, cost, 1.0)
            start = max(start, begin)
        self.reserved += 1
        return max(start, self.hold_until) - now


class LocalLimiter:
    """Limits within one process."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self._books = _Books(requests_per_minute, tokens_per_minute)

    async def wait(self, tokens: int) -> None:
        delay = self._books.reserve(tokens)
        if delay:
            await asyncio.sleep(delay)

    async def hold(self, seconds: float) -> None:
        self._books.hold(seconds)


class RateLimiterActor:
    """The Ray actor body: one per job, named so every worker finds the same books."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self._books = _Books(requests_per_minute, tokens_per_minute)

    def reserve(self, tokens: int) -> float:
        return self._books.reserve(tokens)

    def hold(self, seconds: float) -> None:
        self._books.hold(seconds)

    def reservations(self) -> int:
        return self._books.reserved


class RemoteLimiter:
    """A worker's side of the shared limiter: reserve at the actor, sleep locally."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def wait(self, tokens: int) -> None:
        delay = await self.handle.reserve.remote(tokens)
        if delay:
            await asyncio.sleep(delay)

    async def hold(self, seconds: float) -> None:
        await self.handle.hold.remote(seconds)


def shared_limiter(name: str, requests_per_minute: float | None, tokens_per_minute: float | None):
    """The job's limiter actor (created once, found by name afterwards). Without configured
    limits it still paces the workers from the server's rate-limit headers."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node (a worker node may go away mid-stage: the limiter must not go with
    # it); restarted with fresh books if it dies all the same, its calls retried.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor_cls = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=-1, max_task_retries=-1)(
        RateLimiterActor
    )
    return actor_cls.options(name=name, get_if_exists=True, scheduling_strategy=here).remote(
        requests_per_minute, tokens_per_minute
    )
