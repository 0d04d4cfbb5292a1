"""The teacher client against real HTTP: a loopback OpenAI server behind a fault-injecting proxy."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from huatuo_ray.config import TeacherConfig
from huatuo_ray.teacher.cache import ResponseCache, request_key
from huatuo_ray.teacher.client import TeacherClient, TeacherError, TeacherFatalError
from huatuo_ray.teacher.limiter import LocalLimiter, _Books
from tests.support.openai_servers import FaultyProxy, ScriptedOpenAIServer

KEY = "sk-test-never-log-me-0123456789"


@pytest.fixture()
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HUATUO_TEST_KEY", KEY)
    return KEY


def config(base_url: str, **kw: object) -> TeacherConfig:
    defaults = dict(
        base_url=base_url,
        model="scripted-teacher",
        api_key_env="HUATUO_TEST_KEY",
        timeout_s=0.5,
        max_retries=12,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        max_tokens=64,
    )
    defaults.update(kw)
    return TeacherConfig(**defaults)  # type: ignore[arg-type]


def questions(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"问题{i}：头痛怎么办？"}] for i in range(n)]


async def ask_all(client: TeacherClient, prompts: list[list[dict[str, str]]]) -> list[str]:
    answers = await asyncio.gather(*(client.chat(m) for m in prompts))
    await client.close()
    return [a.text for a in answers]


def test_faults_are_retried_and_nothing_is_paid_twice(tmp_path: Path, api_key: str) -> None:
    cache_dir = tmp_path / "cache"
    with ScriptedOpenAIServer(require_api_key=api_key) as server:
        with FaultyProxy(server.base_url, seed=3, fault_rate=0.3, hang_s=2.0) as proxy:
            client = TeacherClient(config(proxy.base_url), ResponseCache(str(cache_dir)))
            first = asyncio.run(ask_all(client, questions(40)))
            stats = proxy.stats
            assert sum(stats.faults.values()) > 5  # faults really happened
            # Every distinct request was delivered intact exactly once: no answer paid twice.
            assert stats.delivered_ok == 40
            assert set(stats.delivered_ok_by_key.values()) == {1}
            assert client.usage.paid == 40 and client.usage.failed == 0
            assert client.usage.retries == sum(client.usage.errors.values())
            assert client.usage.retries >= sum(stats.faults.values())

            # A rerun (a resumed stage) replays the cache and pays for nothing.
            again = TeacherClient(config(proxy.base_url), ResponseCache(str(cache_dir)))
            assert asyncio.run(ask_all(again, questions(40))) == first
            assert proxy.stats.delivered_ok == 40 and again.usage.cached == 40
            assert again.usage.paid == 0
    # The key is nowhere in what the client wrote.
    for path in cache_dir.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(encoding="utf-8")


def test_retry_after_is_honoured(tmp_path: Path, api_key: str) -> None:
    with ScriptedOpenAIServer() as server:
        with FaultyProxy(server.base_url, p_429=1.0, retry_after_s=0.3) as proxy:
            client = TeacherClient(config(proxy.base_url, max_retries=2))

            async def one() -> float:
                started = time.monotonic()
                with pytest.raises(TeacherError, match="failed after 3 tries"):
                    await client.chat([{"role": "user", "content": "hi"}])
                return time.monotonic() - started

            waited = asyncio.run(one())
            # Two waits of Retry-After (0.3 s), not the 0.01-0.05 s back-off.
            assert waited >= 0.6
            assert client.usage.errors == {"429": 3} and client.usage.failed == 1


def test_client_errors_fail_at_once_without_leaking_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HUATUO_TEST_KEY", "sk-wrong-key")
    with ScriptedOpenAIServer(require_api_key=KEY) as server:
        client = TeacherClient(config(server.base_url))
        with pytest.raises(
            TeacherFatalError
        ) as err:  # every request would meet it: the stage stops
            asyncio.run(client.chat([{"role": "user", "content": "hi"}]))
        assert "HTTP 401 (invalid_api_key): Incorrect API key provided" in str(err.value)
        assert "sk-" not in str(err.value) and err.value.__cause__ is None
        assert server.stats.total == 1


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUATUO_TEST_KEY", raising=False)
    with pytest.raises(TeacherFatalError, match="export HUATUO_TEST_KEY="):
        TeacherClient(config("http://127.0.0.1:9/v1"))


def test_sampling_changes_the_cache_key() -> None:
    msgs = [{"role": "user", "content": "x"}]
    base = request_key("m", msgs, {"temperature": 0.7, "top_p": 1.0})
    assert base == request_key("m", msgs, {"top_p": 1.0, "temperature": 0.7})  # order-free
    assert base != request_key("m", msgs, {"temperature": 0.7, "top_p": 1.0, "seed": 1})
    assert base != request_key("m", msgs, {"temperature": 0.2, "top_p": 1.0})
    assert base != request_key("other", msgs, {"temperature": 0.7, "top_p": 1.0})


def test_concurrency_cap_per_client(api_key: str) -> None:
    with ScriptedOpenAIServer(latency_s=0.1) as server:
        client = TeacherClient(config(server.base_url, max_concurrency=3, timeout_s=5))
        asyncio.run(ask_all(client, questions(12)))
        assert server.stats.max_concurrency == 3


def test_rate_limit_books_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """120 rpm: 0.5 s per request, a burst of 2 (one second's worth) passes at once."""
    clock = [100.0]
    monkeypatch.setattr("huatuo_ray.teacher.limiter.time.monotonic", lambda: clock[0])
    books = _Books(requests_per_minute=120, tokens_per_minute=None)
    assert [books.reserve(1) for _ in range(5)] == [0.0, 0.0, 0.5, 1.0, 1.5]
    clock[0] += 10  # idle: the burst is available again, not ten seconds of backlog
    assert [books.reserve(1) for _ in range(3)] == [0.0, 0.0, 0.5]
    # 6,000 tokens per minute = 100 tokens/s; a burst of one second's worth.
    tokens = _Books(requests_per_minute=None, tokens_per_minute=6000)
    assert [tokens.reserve(50) for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


def test_local_limiter_paces_requests(api_key: str) -> None:
    with ScriptedOpenAIServer() as server:
        client = TeacherClient(
            config(server.base_url, timeout_s=5),
            limiter=LocalLimiter(requests_per_minute=600, tokens_per_minute=None),
        )
        started = time.monotonic()
        asyncio.run(ask_all(client, questions(20)))
        # 10/s with a burst of 10: 20 requests need at least ~1 s.
        assert time.monotonic() - started >= 0.9


def test_env_has_no_key_leak_in_usage(api_key: str) -> None:
    with ScriptedOpenAIServer() as server:
        client = TeacherClient(
            config(server.base_url, price_input_per_1m=2.0, price_output_per_1m=8.0)
        )
        asyncio.run(ask_all(client, questions(3)))
        usage = client.usage.to_dict()
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        expected = (usage["prompt_tokens"] * 2.0 + usage["completion_tokens"] * 8.0) / 1e6
        assert usage["cost_usd"] == pytest.approx(expected, abs=1e-6)
        assert KEY not in repr(usage) and os.environ["HUATUO_TEST_KEY"] == KEY


@pytest.mark.slow
def test_limits_are_shared_by_all_workers_of_a_job(local_ray) -> None:
    """Two Ray workers, one limiter actor: 600 requests/min for the job, not for each worker."""
    import ray

    from huatuo_ray.teacher.limiter import shared_limiter
    from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV

    with ScriptedOpenAIServer(require_api_key=TEACHER_KEY) as server:
        limiter = shared_limiter("test-limiter", requests_per_minute=600, tokens_per_minute=None)
        cfg = config(server.base_url, api_key_env=TEACHER_KEY_ENV, timeout_s=5)

        @ray.remote(num_cpus=0.5)
        def worker(offset: int) -> float:
            from huatuo_ray.teacher.limiter import RemoteLimiter

            client = TeacherClient(cfg, limiter=RemoteLimiter(ray.get_actor("test-limiter")))
            started = time.monotonic()
            asyncio.run(ask_all(client, questions(offset + 15)[offset:]))
            return time.monotonic() - started

        started = time.monotonic()
        ray.get([worker.remote(0), worker.remote(100)])
        elapsed = time.monotonic() - started
        assert ray.get(limiter.reservations.remote()) == 30
        # 10 requests/s with a burst of 10: 30 requests need about 2 s in all. Separate limits
        # per worker would let each pass its 15 in about 0.5 s.
        assert elapsed >= 1.8
        assert server.stats.succeeded == 30
        ray.kill(limiter)
