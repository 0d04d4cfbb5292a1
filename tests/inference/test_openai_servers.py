"""The loopback OpenAI servers, observed through the real ``openai`` client.

What a teacher client must handle is what these servers produce, so each fault is checked by the
exception class the installed ``openai`` package raises for it. Note that a 200 whose body is not
JSON (``garbage``) or is cut short (``truncate``) does not raise an ``openai`` error at all: the
client's ``response.json()`` raises :class:`json.JSONDecodeError` (a ``ValueError``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.support.openai_servers import (
    FAULT_KINDS,
    FaultyProxy,
    ScriptedHTTPError,
    ScriptedOpenAIServer,
    default_responder,
    request_fingerprint,
)

KEY = "sk-test"
MESSAGES = [
    {"role": "system", "content": "你是医生。"},
    {"role": "user", "content": "头痛怎么办？ What should I do?"},
]


def client(base_url: str, timeout: float = 5.0, api_key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)


def ask(c: openai.OpenAI, question: str = "头痛怎么办？", **kwargs: object):
    return c.chat.completions.create(
        model="teacher", messages=[{"role": "user", "content": question}], **kwargs
    )


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(require_api_key=KEY) as s:
        yield s


def test_scripted_server_answers_chat_completion(server: ScriptedOpenAIServer) -> None:
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    c = client(server.base_url)
    request = {"model": "teacher", "messages": MESSAGES, "temperature": 0.0}
    r = c.chat.completions.create(**request)

    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "teacher"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == default_responder(request)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in c.models.list()] == ["scripted-teacher"]

    c.chat.completions.create(**request)  # the same request again: answered (paid) twice
    stats = server.stats
    assert (stats.total, stats.succeeded, stats.by_status) == (2, 2, {200: 2})
    assert stats.answered == {request_fingerprint(request): 2}
    assert stats.answered_more_than_once == {request_fingerprint(request): 2}


def test_responder_answers_and_scripted_errors() -> None:
    def responder(body: dict) -> str:
        question = body["messages"][-1]["content"]
        if question == "fail":
            raise ScriptedHTTPError(503, "overloaded")
        return "答：" + question

    with ScriptedOpenAIServer(responder) as s:
        c = client(s.base_url)
        assert ask(c, "多喝水").choices[0].message.content == "答：多喝水"
        cut = ask(c, "x" * 40, max_tokens=5).choices[0]
        assert (cut.message.content, cut.finish_reason) == ("答：xxxxxxxx", "length")
        with pytest.raises(openai.InternalServerError) as err:
            ask(c, "fail")
        assert err.value.status_code == 503
        assert s.stats.by_status == {200: 2, 503: 1}


def test_wrong_api_key_is_401(server: ScriptedOpenAIServer) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        ask(client(server.base_url, api_key="sk-wrong"))
    assert err.value.status_code == 401
    assert server.stats.by_status == {401: 1} and server.stats.succeeded == 0


def test_max_concurrency_queues_requests() -> None:
    with ScriptedOpenAIServer(latency_s=0.2, max_concurrency=4) as s:
        c = client(s.base_url)
        start = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: ask(c, f"q{i}"), range(12)))
        wall = time.monotonic() - start
        stats = s.stats
    assert len(answers) == 12 and stats.succeeded == 12 and stats.distinct_answered == 12
    assert stats.max_concurrency == 4
    assert stats.max_in_flight >= 4
    assert 0.55 <= wall < 3.0  # three waves of 0.2 s; generous upper bound for slow machines


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("429", openai.RateLimitError),
        ("500", openai.InternalServerError),
        ("hang", openai.APITimeoutError),
        ("drop", openai.APIConnectionError),
        ("garbage", json.JSONDecodeError),
        ("truncate", json.JSONDecodeError),
    ],
)
def test_each_fault_raises_the_expected_client_error(
    server: ScriptedOpenAIServer, kind: str, error: type[Exception]
) -> None:
    with FaultyProxy(server.base_url, seed=1, hang_s=10.0, **{f"p_{kind}": 1.0}) as proxy:
        timeout = 0.5 if kind == "hang" else 5.0
        start = time.monotonic()
        with pytest.raises(error) as err:
            ask(client(proxy.base_url, timeout=timeout))
        assert time.monotonic() - start < 5.0
        stats = proxy.stats
    if kind == "drop":
        assert not isinstance(err.value, openai.APITimeoutError)
    if kind == "429":
        assert err.value.response.headers["retry-after"] == "0.2"
    assert stats.total == 1 and stats.faults[kind] == 1 and stats.faults_injected == 1
    assert stats.delivered_ok == 0
    if kind == "truncate":  # the upstream answered (and would charge) but nothing usable arrived
        assert (stats.forwarded, stats.upstream_ok) == (1, 1)
        assert server.stats.succeeded == 1
    else:
        assert stats.forwarded == 0 and server.stats.total == 0


def test_proxy_without_faults_is_transparent(server: ScriptedOpenAIServer) -> None:
    with FaultyProxy(server.base_url, fault_rate=0.0) as proxy:
        assert proxy.base_url == f"http://127.0.0.1:{proxy.port}/v1"
        direct, proxied = client(server.base_url), client(proxy.base_url)
        a = direct.chat.completions.with_raw_response.create(model="teacher", messages=MESSAGES)
        b = proxied.chat.completions.with_raw_response.create(model="teacher", messages=MESSAGES)
        assert b.status_code == 200
        assert b.headers["content-type"] == a.headers["content-type"]
        assert b.parse().choices[0].message.content == a.parse().choices[0].message.content
        assert b.parse().usage == a.parse().usage
        assert [m.id for m in proxied.models.list()] == ["scripted-teacher"]
        with pytest.raises(openai.AuthenticationError):  # upstream errors pass through as they are
            ask(client(proxy.base_url, api_key="sk-wrong"))
        stats = proxy.stats
    key = request_fingerprint({"model": "teacher", "messages": MESSAGES})
    assert stats.faults_injected == 0 and stats.forwarded == 3
    assert stats.by_status == {200: 2, 401: 1}
    assert stats.delivered_ok == 1 and stats.delivered_ok_by_key == {key: 1}


def outcomes(seed: int, n: int) -> list[str]:
    """What n sequential calls through a half-faulty proxy give, as exception names."""
    with (
        ScriptedOpenAIServer() as s,
        FaultyProxy(
            s.base_url,
            seed=seed,
            fault_rate=0.6,
            fault_kinds=[k for k in FAULT_KINDS if k != "hang"],
        ) as proxy,
    ):
        c = client(proxy.base_url)
        result = []
        for i in range(n):
            try:
                ask(c, f"q{i}")
                result.append("ok")
            except Exception as exc:
                result.append(type(exc).__name__)
        stats = proxy.stats
    assert stats.faults_injected + stats.delivered_ok == n
    return result


def test_fault_sequence_is_reproducible_per_seed() -> None:
    first = outcomes(seed=7, n=30)
    assert first == outcomes(seed=7, n=30)
    assert "ok" in first and len(set(first)) > 2
    assert first != outcomes(seed=8, n=30)


def test_retrying_client_pays_once_per_distinct_request() -> None:
    """The accounting tests of the teacher client rely on: count intact deliveries per request."""
    with (
        ScriptedOpenAIServer() as s,
        FaultyProxy(
            s.base_url,
            seed=3,
            fault_rate=0.5,
            fault_kinds=["429", "500", "drop", "garbage", "truncate"],
            retry_after_s=0.01,
        ) as proxy,
    ):
        c = client(proxy.base_url)
        for i in range(10):
            for _ in range(50):
                try:
                    ask(c, f"question {i}")
                    break
                except (openai.APIError, ValueError):
                    time.sleep(0.01)
        pstats, sstats = proxy.stats, s.stats
    assert len(pstats.delivered_ok_by_key) == 10 and pstats.delivered_more_than_once == {}
    assert pstats.faults_injected > 0
    # Truncated answers were paid upstream without being delivered.
    assert sstats.succeeded == pstats.upstream_ok == 10 + pstats.faults["truncate"]


def test_a_started_server_counts_as_up_only_when_it_serves_its_own_model() -> None:
    """``vllm_server`` picks a free port, which another process may take before vLLM binds it:
    the readiness check must not take that process for the server it started (another server
    on the port, or not HTTP at all), and only then does it start again on another port."""
    import socket

    from huatuo_ray.inference.openai_server import _serves

    with ScriptedOpenAIServer(models=["tiny-teacher"]) as other:
        assert _serves(other.base_url, "tiny-teacher")
        assert not _serves(other.base_url, "dpo")  # another server holds the port
    with socket.socket() as raw:  # a listener that never speaks HTTP
        raw.bind(("127.0.0.1", 0))
        raw.listen()
        assert not _serves(f"http://127.0.0.1:{raw.getsockname()[1]}/v1", "dpo")
    with socket.socket() as s:  # nobody there
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert not _serves(f"http://127.0.0.1:{closed}/v1", "dpo")


def test_a_server_process_ends_with_the_process_that_started_it(tmp_path) -> None:
    """``vllm_server`` starts vLLM in a session of its own; a parent killed with SIGKILL never
    stops it, so the child is tied to the parent's life: here a parent that starts a sleeper
    the same way and is then killed."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
from huatuo_ray.inference.openai_server import tied_to_this_process
child = subprocess.Popen(tied_to_this_process([sys.executable, "-c", "import time; time.sleep(60)"]),
                         start_new_session=True)
open({str(pid_file)!r}, "w").write(str(child.pid))
time.sleep(60)
"""], cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False
        return "\nState:\tZ" not in state  # a zombie has ended (init reaps it, or not)

    time.sleep(0.5)  # the child has exec'd its command by now
    assert alive(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(child)
