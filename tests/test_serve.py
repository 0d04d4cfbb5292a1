"""The serve stage on a local Ray (Ray Serve, HF engine on the tiny model) through the real
OpenAI client, and the chat client keeping a multi-turn history against it."""

from __future__ import annotations

import io

import openai
import pytest

from huatuo_ray.config import ModelConfig
from huatuo_ray.inference.generation import EngineConfig
from huatuo_ray.inference.openai_server import free_port
from huatuo_ray.serve import chat_client, endpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tiny_model_dir: str, local_ray):
    from ray import serve

    result = endpoint.main(endpoint.ServeConfig(
        model=ModelConfig(path=tiny_model_dir), name="tiny", engine=EngineConfig(backend="hf"),
        num_cpus=0.5, max_new_tokens=16, port=free_port()))  # fmt: skip
    yield result["base_url"]
    serve.shutdown()


def test_serve_answers_the_openai_client_and_refuses_bad_requests(served: str) -> None:
    client = openai.OpenAI(base_url=served, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "头痛怎么办？"}], max_tokens=8, seed=1
    )
    assert reply.choices[0].message.role == "assistant"
    assert 0 < reply.usage.completion_tokens <= 8
    again = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "头痛怎么办？"}], max_tokens=8, seed=1
    )
    assert again.choices[0].message.content == reply.choices[0].message.content  # seeded
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_chat_client_keeps_the_conversation(served: str) -> None:
    config = chat_client.ChatConfig(base_url=served, model="tiny", system="你是医生。")
    config.endpoint.max_tokens = 8
    out = io.StringIO()
    history = chat_client.converse(
        config, io.StringIO("我头痛。\n\n已经三天了。\n/reset\n还在吗？\n"), out
    )
    # After /reset only the system prompt and the last exchange remain.
    assert [t["role"] for t in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "还在吗？"
    assert out.getvalue().count("医生: ") == 3 and "(new conversation)" in out.getvalue()
