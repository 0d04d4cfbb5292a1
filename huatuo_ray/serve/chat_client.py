"""Stage ``chat``: talk to a served model in the terminal, keeping the conversation.

    python -m huatuo_ray chat --base-url http://127.0.0.1:8000/v1 --model huatuo
    HUATUO_SERVE_KEY=... python -m huatuo_ray chat --config jobs/tiny/chat.yaml

Every line you type is the patient's turn; the whole history (optionally after a system prompt)
goes with each request, so the model sees the conversation as SFT showed it multi-turn dialogues.
Answers stream in as the model writes them. ``/reset`` starts over, ``/exit`` (or end of input)
quits. Works with any OpenAI-compatible endpoint: ``serve``, vLLM's server, or a hosted model;
the key, if the endpoint wants one, comes from the variable ``endpoint.api_key_env`` names.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from huatuo_ray.config import TeacherConfig, option


def _endpoint() -> TeacherConfig:
    return TeacherConfig(base_url="http://127.0.0.1:8000/v1", model="huatuo", api_key_env="",
                         temperature=0.7, max_tokens=512, timeout_s=120)  # fmt: skip


@dataclass
class ChatConfig:
    """A terminal chat with a served model."""

    endpoint: TeacherConfig = field(default_factory=_endpoint)
    system: str | None = option(None, help="a system prompt put first")
    base_url: str | None = option(None, help="shortcut for endpoint.base_url")
    model: str | None = option(None, help="shortcut for endpoint.model")


def converse(config: ChatConfig, lines: TextIO, out: TextIO) -> list[dict[str, str]]:
    """Read turns from ``lines`` until /exit or EOF, print answers to ``out``; the history."""
    import openai

    from huatuo_ray.teacher.client import api_key

    endpoint = config.endpoint
    client = openai.OpenAI(base_url=config.base_url or endpoint.base_url,
                           api_key=api_key(endpoint), timeout=endpoint.timeout_s)  # fmt: skip
    model = config.model or endpoint.model
    start = [{"role": "system", "content": config.system}] if config.system else []
    history = list(start)
    out.write("huatuo chat: /reset starts over, /exit quits\n")
    for line in lines:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            out.write("(new conversation)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        out.write("医生: ")
        answer = ""
        for chunk in client.chat.completions.create(
            model=model, messages=history, temperature=endpoint.temperature,
            max_tokens=endpoint.max_tokens, stream=True,
        ):  # fmt: skip
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                answer += piece
                out.write(piece)
                out.flush()
        if answer:
            history.append({"role": "assistant", "content": answer})
        else:  # nothing to keep: an empty turn would not render
            history.pop()
            out.write("(no answer)")
        out.write("\n")
        out.flush()
    return history


def main(config: ChatConfig) -> dict[str, Any]:
    history = converse(config, sys.stdin, sys.stdout)
    return {"turns": len(history)}
