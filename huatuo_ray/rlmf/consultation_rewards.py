"""Rule rewards on a whole consultation, for the ``function`` reward kind with
``rollout.mode: consultation`` (``reward.function: huatuo_ray.rlmf.consultation_rewards:NAME``).

Each takes ``(prompt, response, reference, meta)`` like every reward function; it reads the
consultation from ``meta["turns"]`` (the doctor's view: ``user`` = the patient). They are
lexical rules for Chinese consultations, cheap and exact about what they check, meant to be
summed with the teacher's rating, not to replace it.
"""

from __future__ import annotations

from typing import Any

#: What marks a question in a doctor's turn: question marks and the usual Chinese question
#: words and particles.
QUESTION_MARKERS = ("?", "？", "吗", "什么", "是否", "怎么", "多久", "哪", "几")
#: Phrases that state a diagnosis as certain (the paper's doctors hedge until they know).
CERTAINTY_MARKERS = ("肯定是", "一定是", "绝对是", "毫无疑问", "百分之百", "确诊是", "就是这个病")


def _doctor_turns(meta: dict[str, Any]) -> list[str]:
    return [t["content"] for t in meta["turns"] if t["role"] == "assistant"]


def asks_question(text: str) -> bool:
    return any(marker in text for marker in QUESTION_MARKERS)


def asks_first(prompt: str, response: str, reference: str, meta: dict[str, Any]) -> float:
    """1 when the doctor's first turn asks the patient something, else 0: a doctor gathers
    what it needs before it advises."""
    turns = _doctor_turns(meta)
    return float(bool(turns) and asks_question(turns[0]))


def asks_question_here(prompt: str, response: str, reference: str, meta: dict[str, Any]) -> float:
    """For ``granularity: turn``: 1 when this doctor turn asks the patient something, else 0."""
    return float(asks_question(response))


def no_certain_diagnosis(prompt: str, response: str, reference: str, meta: dict[str, Any]) -> float:
    """0 when no doctor turn states a diagnosis as certain, -1 when one does."""
    return -float(any(m in turn for turn in _doctor_turns(meta) for m in CERTAINTY_MARKERS))
