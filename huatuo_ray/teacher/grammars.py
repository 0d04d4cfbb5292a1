"""Answer shapes, one per prompt, in the two forms a server can enforce.

With ``teacher.structured_outputs`` on, every request carries the shape its parser reads:

* ``vllm`` (or ``true``): vLLM's own field, ``extra_body={"structured_outputs": {"regex"|"choice":
  ...}}``. A small local model, or the tiny random one of the tests and the demo, then still
  answers in the plain-text shape the parser reads, so the whole pipeline runs end to end.
* ``json_schema``: OpenAI's ``response_format={"type": "json_schema", "json_schema": {...}}``,
  which OpenAI, Azure OpenAI and vLLM accept (OpenAI refuses vLLM's field as an unknown
  argument). The answer is then a JSON object; every parser reads it as well as the plain text.

The schemas keep to OpenAI's strict subset: every property required, no additional properties,
only ``type``, ``enum``, ``items``, ``minItems``/``maxItems`` and ``minimum``/``maximum``. Each
shape is checked by a test to parse with its parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from huatuo_ray.teacher.parsers import RATING_REGEX, SPEAKERS, VERDICT_CHOICES

_HAN = "[\u4e00-\u9fa5]"


@dataclass(frozen=True)
class Shape:
    """One answer shape: vLLM's constraint and the JSON schema of the same answer."""

    name: str  # the json_schema's name (letters, digits, _ and -)
    vllm: dict[str, Any]
    schema: dict[str, Any]

    def request(self, mode: str) -> dict[str, Any]:
        """The request fields that ask for this shape in ``mode`` (``vllm`` / ``json_schema``)."""
        if mode == "json_schema":
            return {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": self.name, "strict": True, "schema": self.schema},
                }
            }
        return {"extra_body": {"structured_outputs": self.vllm}}


def _object(**properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_TEXT = {"type": "string"}


def answer() -> Shape:
    """A doctor's or a patient's utterance: Chinese text in a few sentences."""
    return Shape(
        "answer",
        {"regex": f"{_HAN}{{6,40}}[。？]({_HAN}{{4,30}}[。？]){{0,2}}"},
        _object(answer=_TEXT),
    )


def triplets(n: int) -> Shape:
    """``n`` numbered <role, instruction, input> triplets in the labelled format."""
    one = (
        f"\\d{{1,2}}\\.\\n角色：{_HAN}{{2,8}}\\n指令：{_HAN}{{8,30}}。\\n输入：{_HAN}{{0,40}}\\n\\n"
    )
    item = _object(role=_TEXT, instruction=_TEXT, input=_TEXT)
    return Shape(
        "triplets",
        {"regex": f"({one}){{{n}}}"},
        _object(triplets={"type": "array", "items": item, "minItems": n, "maxItems": n}),
    )


def polished_dialogue(turns: list[dict[str, str]]) -> Shape:
    """The dialogue polish format with exactly the speakers of ``turns``, in order (the JSON form
    fixes the count; the parser checks the order)."""
    spoken = [t for t in turns if t["role"] != "system"]
    lines = [
        f"\\[{i}\\] {SPEAKERS[t['role']]}：{_HAN}{{4,40}}。" for i, t in enumerate(spoken, start=1)
    ]
    item = _object(speaker={"type": "string", "enum": list(SPEAKERS.values())}, content=_TEXT)
    n = len(spoken)
    return Shape(
        "dialogue",
        {"regex": "\\n\\n".join(lines)},
        _object(turns={"type": "array", "items": item, "minItems": n, "maxItems": n}),
    )


def rating() -> Shape:
    score = {"type": "number", "minimum": 1, "maximum": 10}
    return Shape("ratings", {"regex": RATING_REGEX}, _object(rating_a=score, rating_b=score))


def verdict() -> Shape:
    return Shape(
        "verdict",
        {"choice": list(VERDICT_CHOICES)},
        _object(verdict={"type": "string", "enum": list(VERDICT_CHOICES)}),
    )
