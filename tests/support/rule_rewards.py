"""Reward functions for the ``function`` reward kind in tests (``module:function`` names)."""

from __future__ import annotations

from typing import Any

TARGET_WORD = "的"


def count_target_word(prompt: str, response: str, reference: str, meta: dict[str, Any]) -> float:
    """How often the target word occurs in the response (at most 8); raises when it does not
    occur at all, so a run also shows that a raising function is counted, not fatal."""
    count = response.count(TARGET_WORD)
    if count == 0:
        raise ValueError("no target word")
    return float(min(count, 8))


def always_fails(prompt: str, response: str, reference: str, meta: dict[str, Any]) -> float:
    raise RuntimeError("a broken verifier")


def turn_and_history(prompt: str, response: str, reference: str, meta: dict[str, Any]) -> float:
    """For ``granularity: turn``: 10 x the doctor turn's number (from 0) + the turns it sees
    (the consultation up to it), so a test can tell which call got what."""
    return 10.0 * meta["turn"] + len(meta["turns"])
