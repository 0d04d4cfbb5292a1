"""Requests-per-minute and tokens-per-minute limits shared by every worker of a job.

An API's limits hold for the whole key, not per process, so one :class:`RateLimiter` Ray actor
keeps the books for all workers. It uses the "virtual scheduling" form of a token bucket (GCRA):
each reservation moves a ``next free`` time forward by its cost, and the caller sleeps until its
slot; a burst of up to one second's worth of capacity passes at once. Workers talk to it through
:class:`RemoteLimiter`; in a single process :class:`LocalLimiter` does the same job.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol


class Limiter(Protocol):
    async def wait(self, tokens: int) -> None: ...


def _gcra(tat: float, now: float, cost: float, tolerance: float) -> tuple[float, float]:
    """(start time, new theoretical arrival time) of one reservation costing ``cost`` seconds."""
    tat = max(tat, now)
    return max(now, tat - tolerance), tat + cost


class _Books:
    """The arithmetic, shared by the local and the actor versions."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.tat_requests = self.tat_tokens = time.monotonic()
        self.reserved = 0

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
        return start - now


class LocalLimiter:
    """Limits within one process."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self._books = _Books(requests_per_minute, tokens_per_minute)

    async def wait(self, tokens: int) -> None:
        delay = self._books.reserve(tokens)
        if delay:
            await asyncio.sleep(delay)


class RateLimiterActor:
    """The Ray actor body: one per job, named so every worker finds the same books."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self._books = _Books(requests_per_minute, tokens_per_minute)

    def reserve(self, tokens: int) -> float:
        return self._books.reserve(tokens)

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


def shared_limiter(name: str, requests_per_minute: float | None, tokens_per_minute: float | None):
    """The job's limiter actor (created once, found by name afterwards), or None without limits."""
    if not requests_per_minute and not tokens_per_minute:
        return None
    import ray

    actor_cls = ray.remote(num_cpus=0, max_concurrency=1)(RateLimiterActor)
    return actor_cls.options(name=name, get_if_exists=True).remote(
        requests_per_minute, tokens_per_minute
    )
