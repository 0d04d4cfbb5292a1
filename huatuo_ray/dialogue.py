"""The one record shape of the project and the one chat format.

Every SFT, RL and evaluation record is a :class:`Dialogue`: ``id``, ``source``, ``turns`` and
``meta``. A single-turn instruction is a dialogue of two turns.

The chat format is HuatuoGPT's (see the released ``huatuo_cli_demo_stream.py`` and
``scripts/finetune.py``)::

    {system}<病人>：{question} <HuatuoGPT>：{answer}</s><病人>：{question} <HuatuoGPT>：

It exists twice, on purpose, and a test keeps the two equal:

* :data:`CHAT_TEMPLATE`, a Jinja template saved as every model's ``tokenizer.chat_template`` so that
  ``transformers``, vLLM's server and anyone else render prompts the way the model was trained;
* :func:`tokenize_dialogue` / :func:`encode_prompt`, which build token ids segment by segment. The
  segments are tokenised one at a time (as HuatuoGPT's own trainer did) so that the loss mask is
  exact: a BPE merge can never blur the border between a masked and a supervised token.

Loss mask: only the content of assistant turns and the EOS that closes them are supervised. The role
tag ``<HuatuoGPT>：`` is part of the prompt at inference time (``add_generation_prompt``), so it is
masked like the rest of the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100

DEFAULT_SYSTEM = (
    "一位用户和智能医疗大模型HuatuoGPT之间的对话。对于用户的医疗问诊，HuatuoGPT给出准确的、详细的、温暖的指导建议。"
    "对于用户的指令问题，HuatuoGPT给出有益的、详细的、有礼貌的回答。"
)
USER_TAG = "<病人>："
ASSISTANT_TAG = "<HuatuoGPT>："

# Jinja twin of tokenize_dialogue(); test_chat.py checks that both give the same text.
CHAT_TEMPLATE = (
    "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] }}{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{{ '" + DEFAULT_SYSTEM + "' }}{%- set rest = messages -%}"
    "{%- endif -%}"
    "{%- for m in rest -%}"
    "{%- if m['role'] == 'user' -%}{{ '" + USER_TAG + "' + m['content'] + ' ' }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{ '" + ASSISTANT_TAG + "' }}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT_TAG + "' }}{%- endif -%}"
)


class RecordError(ValueError):
    """A record that does not have the project's dialogue shape."""


@dataclass
class Dialogue:
    """One conversation. ``turns`` holds ``{"role": ..., "content": ...}`` dicts in order."""

    id: str
    source: str
    turns: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> Dialogue:
        """Raise :class:`RecordError` naming the first problem; return self when fine."""
        if not isinstance(self.id, str) or not self.id:
            raise RecordError("missing or empty id")
        for i, turn in enumerate(self.turns):
            if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
                raise RecordError(f"turn {i} must have exactly the keys role and content")
            if turn["role"] not in ROLES:
                raise RecordError(f"turn {i} has unknown role {turn['role']!r}")
            if turn["role"] == "system" and i != 0:
                raise RecordError(f"turn {i}: a system turn may only come first")
            if not isinstance(turn["content"], str) or not turn["content"].strip():
                raise RecordError(f"turn {i} ({turn['role']}) is empty")
        return self

    @property
    def n_assistant(self) -> int:
        return sum(t["role"] == "assistant" for t in self.turns)

    def spoken(self) -> list[dict[str, str]]:
        """Copies of the user and assistant turns, in order (the system turn left out)."""
        return [dict(t) for t in self.turns if t["role"] != "system"]

    def to_row(self) -> dict[str, Any]:
        """The Parquet row: ``meta`` is stored as a JSON string so that shards keep one schema."""
        return {
            "id": self.id,
            "source": self.source,
            "turns": [{"role": t["role"], "content": t["content"]} for t in self.turns],
            "meta": json.dumps(self.meta, ensure_ascii=False, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Dialogue:
        meta = row.get("meta") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        turns = [{"role": t["role"], "content": t["content"]} for t in row["turns"]]
        return cls(id=str(row["id"]), source=str(row["source"]), turns=turns, meta=meta)


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _split_system(turns: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    if turns and turns[0]["role"] == "system":
        return turns[0]["content"], turns[1:]
    return DEFAULT_SYSTEM, turns


def render(
    turns: list[dict[str, str]],
    eos_token: str,
    add_generation_prompt: bool = False,
    bos_token: str | None = None,
) -> str:
    """Render a dialogue as text, exactly as :data:`CHAT_TEMPLATE` does.

    The text starts with ``bos_token`` when given, as the template does, so that servers which
    tokenise templated text without special tokens (vLLM's chat endpoint) still see the BOS the
    model was trained with.
    """
    system, rest = _split_system(turns)
    parts = [bos_token or "", system]
    for t in rest:
        if t["role"] == "user":
            parts.append(f"{USER_TAG}{t['content']} ")
        else:
            parts.append(f"{ASSISTANT_TAG}{t['content']}{eos_token}")
    if add_generation_prompt:
        parts.append(ASSISTANT_TAG)
    return "".join(parts)


def _segments(turns: list[dict[str, str]]) -> Iterable[tuple[str, bool]]:
    """Yield (text, supervised) pieces; EOS is added by the caller after supervised text."""
    system, rest = _split_system(turns)
    yield system, False
    for t in rest:
        if t["role"] == "user":
            yield f"{USER_TAG}{t['content']} ", False
        else:
            yield ASSISTANT_TAG, False
            yield t["content"], True


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """One segment's token ids, no special tokens (segments are encoded one by one)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer starts text with one (Llama-style), else [].

    Asked of the tokenizer itself: transformers 5 does not save ``add_bos_token`` and reloads it
    as False while the saved post-processor still adds BOS.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if list(tokenizer("a")["input_ids"][:1]) == [bos] else []


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_dialogue(tokenizer: Any, turns: list[dict[str, str]], max_length: int) -> Tokenized:
    """Token ids and labels for training; everything but assistant content (+ EOS) is -100.

    Truncation keeps the first ``max_length`` tokens (HuatuoGPT's rule: the context of a reply is
    worth more than the reply's tail). A sample left with no supervised token raises
    :class:`RecordError`, and the caller counts it as a reject with that reason.
    """
    if not any(t["role"] == "assistant" for t in turns):
        raise RecordError("no assistant turn to learn from")
    input_ids = _bos(tokenizer)
    labels = [IGNORE_INDEX] * len(input_ids)
    for text, supervised in _segments(turns):
        ids = encode_text(tokenizer, text)
        if supervised:
            ids.append(tokenizer.eos_token_id)
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise RecordError(f"no supervised token left within max_length={max_length}")
    return Tokenized(input_ids, labels, truncated)


def encode_prompt(tokenizer: Any, turns: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt ending in the assistant tag, for sampling and serving.

    Built from the same segments as :func:`tokenize_dialogue`, so a prompt is tokenised exactly as
    the same context was during training.
    """
    if turns and turns[-1]["role"] == "assistant":
        raise RecordError("a prompt must end with a user turn")
    ids = _bos(tokenizer)
    for text, supervised in _segments(turns):
        ids += encode_text(tokenizer, text)
        if supervised:
            ids.append(tokenizer.eos_token_id)
    return ids + encode_text(tokenizer, ASSISTANT_TAG)
