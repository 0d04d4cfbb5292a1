"""Answer shapes for vLLM's structured outputs, one per prompt.

With ``teacher.structured_outputs: true`` (for teachers served by vLLM), every request carries the
shape its parser reads, as ``extra_body={"structured_outputs": {...}}``. A strong teacher does not
need it; a small local model, or the tiny random one of the tests and the demo, then still answers
in a parseable shape, so the whole pipeline runs end to end. Each shape is checked by a test to
parse with its parser.
"""

from __future__ import annotations

from typing import Any

from huatuo_ray.teacher.parsers import RATING_REGEX, SPEAKERS, VERDICT_CHOICES

_HAN = "[\u4e00-\u9fa5]"


def answer() -> dict[str, Any]:
    """A doctor's or a patient's utterance: Chinese text in a few sentences."""
    return {"regex": f"{_HAN}{{6,40}}[。？]({_HAN}{{4,30}}[。？]){{0,2}}"}


def triplets(n: int) -> dict[str, Any]:
    """``n`` numbered <role, instruction, input> triplets in the labelled format."""
    one = (
        f"\\d{{1,2}}\\.\\n角色：{_HAN}{{2,8}}\\n指令：{_HAN}{{8,30}}。\\n输入：{_HAN}{{0,40}}\\n\\n"
    )
    return {"regex": f"({one}){{{n}}}"}


def polished_dialogue(turns: list[dict[str, str]]) -> dict[str, Any]:
    """The dialogue polish format with exactly the speakers of ``turns``, in order."""
    spoken = [t for t in turns if t["role"] != "system"]
    lines = [
        f"\\[{i}\\] {SPEAKERS[t['role']]}：{_HAN}{{4,40}}。" for i, t in enumerate(spoken, start=1)
    ]
    return {"regex": "\\n\\n".join(lines)}


def rating() -> dict[str, Any]:
    return {"regex": RATING_REGEX}


def verdict() -> dict[str, Any]:
    return {"choice": list(VERDICT_CHOICES)}
