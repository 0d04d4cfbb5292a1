"""The teacher client against a hosted API's rules: request shape per model, fatal errors,
filtered and cut answers, Azure's endpoint, rate-limit headers, time-outs paid twice.

The server is :class:`~tests.support.hosted_api.HostedAPIServer`: real HTTP on 127.0.0.1 with
the status codes and error bodies of OpenAI and Azure OpenAI.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from huatuo_ray.artifacts import reason_kind
from huatuo_ray.config import TeacherConfig
from huatuo_ray.dialogue import RecordError
from huatuo_ray.teacher import grammars, parsers
from huatuo_ray.teacher.client import TeacherClient, TeacherFatalError, redact
from huatuo_ray.teacher.limiter import LocalLimiter, pacing_delay, parse_duration
from huatuo_ray.teacher.stage import ask_parsed
from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV
from tests.support.hosted_api import (
    QUOTA_MESSAGE,
    HostedAPIServer,
    invalid_key_message,
    strict_schema_error,
)
from tests.support.openai_servers import ScriptedHTTPError, ScriptedReply

HI = [{"role": "user", "content": "你好"}]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEACHER_KEY_ENV, TEACHER_KEY)


def config(base_url: str, **overrides: Any) -> TeacherConfig:
    values: dict[str, Any] = dict(
        base_url=base_url,
        model="scripted-teacher",
        api_key_env=TEACHER_KEY_ENV,
        timeout_s=5.0,
        max_retries=3,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
    )
    return TeacherConfig(**{**values, **overrides})


class Recorder:
    """A responder keeping the bodies it answered."""

    def __init__(self, answer: Any = "好的。") -> None:
        self.bodies: list[dict[str, Any]] = []
        self.answer = answer
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Any:
        with self._lock:
            self.bodies.append(body)
        return self.answer(body) if callable(self.answer) else self.answer


def ask(client: TeacherClient, messages=HI, **sampling: Any):
    async def go():
        try:
            return await client.chat(messages, **sampling)
        finally:
            await client.close()

    return asyncio.run(go())


# --------------------------------------------------------------------------- request shape


def test_reasoning_model_configured_gets_its_answers() -> None:
    recorder = Recorder()
    with HostedAPIServer(recorder, reasoning_models={"o3-mini"}) as server:
        cfg = config(
            server.base_url, model="o3-mini", temperature=None, top_p=None, reasoning_effort="low"
        )
        answer = ask(TeacherClient(cfg))
    assert answer.text == "好的。"
    body = recorder.bodies[0]
    assert body["max_completion_tokens"] == 1024 and body["reasoning_effort"] == "low"
    assert not {"max_tokens", "temperature", "top_p"} & set(body)


@pytest.mark.parametrize(
    ("model", "overrides", "named"),
    [
        # a reasoning model the client cannot recognise by name, on the defaults
        ("scripted-reasoner", {}, "'max_tokens' is not supported with this model"),
        # recognised (max_completion_tokens), but the default temperature is refused
        ("o3-mini", {}, "'temperature' does not support 0.7"),
        ("o3-mini", {"temperature": None}, "'top_p'"),
        (
            "scripted-reasoner",
            {"max_tokens_field": "max_completion_tokens", "temperature": 1.0, "top_p": 1.0},
            None,
        ),  # fmt: skip
    ],
)
def test_reasoning_model_on_defaults_fails_fast_naming_the_parameter(
    model: str, overrides: dict[str, Any], named: str | None
) -> None:
    with HostedAPIServer(reasoning_models={model}, require_api_key=TEACHER_KEY) as server:
        client = TeacherClient(config(server.base_url, model=model, **{"top_p": 0.9, **overrides}))
        if named is None:
            ask(client)
            return
        with pytest.raises(TeacherFatalError, match=named) as err:
            ask(client)
        assert "HTTP 400 (unsupported_" in str(err.value)
        with pytest.raises(TeacherFatalError):  # every later call: no request at all
            asyncio.run(client.chat([{"role": "user", "content": "again"}]))
        assert server.stats.total == 1


def test_unknown_field_is_fatal_and_vllm_field_is_refused_by_openai() -> None:
    with HostedAPIServer() as server:
        client = TeacherClient(config(server.base_url))
        with pytest.raises(TeacherFatalError, match="Unrecognized request argument supplied: "):
            asyncio.run(client.chat(HI, extra_body={"structured_outputs": {"regex": "x"}}))
        client = TeacherClient(config(server.base_url, reasoning_effort="high"))  # a chat model
        with pytest.raises(TeacherFatalError, match="supplied: reasoning_effort"):
            ask(client)


# --------------------------------------------------------------------------- fatal errors


def test_wrong_key_unknown_model_and_quota_stop_at_once_without_the_key() -> None:
    def responder(body: dict[str, Any]) -> str:
        if "quota" in body["messages"][0]["content"]:
            raise ScriptedHTTPError(429, QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota")
        if "key" in body["messages"][0]["content"]:  # OpenAI's 401 shows the key's ends
            raise ScriptedHTTPError(
                401, invalid_key_message(TEACHER_KEY), "invalid_request_error", "invalid_api_key"
            )
        return "好的。"

    with HostedAPIServer(responder) as server:
        cases = [
            ({"model": "gpt-9"}, "HTTP 404 (model_not_found): The model `gpt-9` does not exist"),
            ({}, "HTTP 429 (insufficient_quota): You exceeded your current quota"),
            ({}, "HTTP 401 (invalid_api_key): Incorrect API key provided: [key]"),
        ]
        for (overrides, said), text in zip(cases, ["hi", "quota", "key"]):
            before = server.stats.total
            started = time.monotonic()
            client = TeacherClient(config(server.base_url, max_retries=6, **overrides))
            with pytest.raises(TeacherFatalError) as err:
                ask(client, [{"role": "user", "content": text}])
            assert said in str(err.value)
            assert server.stats.total - before == 1  # not retried
            assert time.monotonic() - started < 2
            message = str(err.value)
            for piece in (TEACHER_KEY, TEACHER_KEY[-4:], "****"):
                assert piece not in message


def test_redact_takes_out_the_key_and_its_pieces() -> None:
    key = "sk-proj-abcdefgh12345678"
    said = f"key {key}; shown as sk-pro****5678 and {key[:8]}… {key[-6:]}"
    out = redact(said, key)
    assert "abcdefgh" not in out and "5678" not in out and "sk-" not in out


# --------------------------------------------------------------------------- answers that are none


def test_filtered_refused_and_empty_answers_come_back_at_once() -> None:
    replies = {
        "filter": ScriptedReply(None, "content_filter"),
        "refuse": ScriptedReply(None, "stop", refusal="I can't help with that."),
        "empty": ScriptedReply(None, "stop"),
    }
    with HostedAPIServer(lambda body: replies[body["messages"][0]["content"]]) as server:
        for text, finish in [("filter", "content_filter"), ("refuse", "refusal"),
                             ("empty", "empty")]:  # fmt: skip
            client = TeacherClient(config(server.base_url))
            answer = ask(client, [{"role": "user", "content": text}])
            assert (answer.text, answer.finish_reason) == ("", finish)
            assert client.usage.paid == 1 and client.usage.retries == 0
        assert server.stats.total == 3


def test_cut_and_filtered_answers_are_rejects_asked_again_at_most_once() -> None:
    recorder = Recorder(
        lambda body: (
            ScriptedReply(None, "content_filter")
            if "filter" in body["messages"][0]["content"]
            else "答" * 50
        )  # 25 scripted tokens: cut at any max_tokens under 25
    )
    with HostedAPIServer(recorder) as server:

        async def run(text: str, max_tokens: int, retries: int) -> str:
            client = TeacherClient(config(server.base_url, max_tokens=max_tokens))
            try:
                await ask_parsed(
                    client, [{"role": "user", "content": text}], parsers.parse_answer, retries
                )
                return "record"
            except RecordError as e:
                return str(e)
            finally:
                await client.close()

        assert asyncio.run(run("cut", 5, 3)) == "answer cut at max_tokens=10"
        asked = [b["max_tokens"] for b in recorder.bodies]
        assert asked == [5, 10]  # the limit raised once, then rejected
        assert asyncio.run(run("fits", 20, 3)) == "record"  # 40 fits after the raise
        recorder.bodies.clear()
        reason = asyncio.run(run("filter", 100, 3))
        assert reason == "answer filtered by the teacher's content filter"
        assert len(recorder.bodies) == 2  # asked again once, not six times
        assert asyncio.run(run("filter", 100, 0)) == reason
        assert server.stats.total == 2 + 2 + 2 + 1


def test_reject_reasons_group_numbers_not_names() -> None:
    assert reason_kind("undecodable bytes (not GB18030)") == "undecodable bytes (not GB18030)"
    assert reason_kind("answer cut at max_tokens=2048") == "answer cut at max_tokens=N"
    assert reason_kind("turn count differs: got 3, expected 12") == (
        "turn count differs: got N, expected N"
    )


# --------------------------------------------------------------------------- structured outputs


def test_json_schemas_are_strict_and_their_answers_parse() -> None:
    turns = [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "休息"}]
    shapes = {
        "answer": (grammars.answer(), '{"answer": "<HuatuoGPT回复>：多喝水。"}',
                   parsers.parse_answer, "多喝水。"),
        "rating": (grammars.rating(), '{"rating_a": 7, "rating_b": 9.5}',
                   parsers.parse_rating, (7.0, 9.5)),
        "verdict": (grammars.verdict(), '{"verdict": "Assistant 1 is worse than Assistant 2"}',
                    parsers.parse_verdict, "worse"),
    }  # fmt: skip
    for shape, text, parse, expected in shapes.values():
        assert strict_schema_error(shape.schema) is None
        assert parse(text) == expected
        fmt = shape.request("json_schema")["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    dialogue = grammars.polished_dialogue(turns)
    assert strict_schema_error(dialogue.schema) is None
    said = '{"turns": [{"speaker": "病人", "content": "头很痛。"}, {"speaker": "医生", "content": "请休息。"}]}'
    assert [t["content"] for t in parsers.parse_polished_dialogue(said, turns)] == [
        "头很痛。",
        "请休息。",
    ]
    swapped = said.replace("病人", "X").replace("医生", "病人").replace("X", "医生")
    with pytest.raises(parsers.ParseError, match="role order differs"):
        parsers.parse_polished_dialogue(swapped, turns)
    three = grammars.triplets(3)
    assert three.schema["properties"]["triplets"]["minItems"] == 3
    found = parsers.parse_triplets(
        '{"triplets": [{"role": "药师", "instruction": "列出副作用。", "input": "无"}]}'
    )
    assert found == [parsers.Triplet("药师", "列出副作用。", "")]
    with pytest.raises(parsers.ParseError, match="wrong JSON shape"):
        parsers.parse_rating('{"score": 3}')
    assert strict_schema_error({"type": "object", "properties": {"a": {}}, "required": ["a"]})


# --------------------------------------------------------------------------- Azure OpenAI


def test_azure_deployment_path_api_version_and_api_key_header() -> None:
    with HostedAPIServer(
        Recorder(), azure_deployments={"teacher-4o": "gpt-4o"}, require_api_key=TEACHER_KEY
    ) as server:
        cfg = config(server.origin, api_kind="azure", model="teacher-4o")
        assert ask(TeacherClient(cfg)).text == "好的。"
        call = server.azure_calls[-1]
        assert call == {
            "deployment": "teacher-4o",
            "api_version": "2024-10-21",
            "api_key": TEACHER_KEY,
            "authorization": None,  # the key travels in api-key only
        }
        with pytest.raises(TeacherFatalError, match="HTTP 404 \\(DeploymentNotFound\\)"):
            ask(TeacherClient(config(server.origin, api_kind="azure", model="nope")))


def test_azure_wrong_key_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEACHER_KEY_ENV, "wrong-azure-key-000")
    with HostedAPIServer(azure_deployments={"d": "gpt-4o"}, require_api_key=TEACHER_KEY) as s:
        with pytest.raises(TeacherFatalError, match="HTTP 401 \\(401\\): Access denied") as err:
            ask(TeacherClient(config(s.origin, api_kind="azure", model="d")))
        assert "wrong-azure-key" not in str(err.value)


# --------------------------------------------------------------------------- pacing, time-outs


def test_rate_limit_headers_read() -> None:
    assert parse_duration("6m0s") == 360 and parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5) and parse_duration("x") is None
    spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"}
    assert pacing_delay(spent, 100) == 1.5
    tokens = {"x-ratelimit-remaining-tokens": "50", "x-ratelimit-reset-tokens": "250ms"}
    assert pacing_delay(tokens, 100) == 0.25 and pacing_delay(tokens, 10) == 0
    assert pacing_delay({"retry-after-ms": "300", "retry-after": "1"}, 1) == pytest.approx(0.3)
    assert pacing_delay({"x-ratelimit-remaining-requests": "9"}, 1) == 0


def test_spent_budget_in_headers_holds_every_request() -> None:
    def headers(answered: int) -> dict[str, str]:
        left = "0" if answered == 1 else "100"
        return {"x-ratelimit-remaining-requests": left, "x-ratelimit-reset-requests": "800ms"}

    with HostedAPIServer(rate_limit=headers) as server:
        client = TeacherClient(config(server.base_url), limiter=LocalLimiter(None, None))

        async def go() -> list[float]:
            starts = []
            for i in range(3):
                starts.append(time.monotonic())
                await client.chat([{"role": "user", "content": f"q{i}"}])
            await client.close()
            return starts

        t0 = time.monotonic()
        asyncio.run(go())
        elapsed = time.monotonic() - t0
    assert 0.75 < elapsed < 3  # one pause of 0.8 s after the first answer, none after


def test_timed_out_and_retried_counts_as_possibly_paid_twice() -> None:
    calls = []

    async def slow_first(body: dict[str, Any]) -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(1.0)
        return "好的。"

    with HostedAPIServer(slow_first) as server:
        client = TeacherClient(config(server.base_url, timeout_s=0.3))
        assert ask(client).text == "好的。"
    assert client.usage.possibly_paid_twice == 1 and client.usage.paid == 1


def test_default_timeout_fits_a_slow_long_answer() -> None:
    assert TeacherConfig().timeout_s >= 600
