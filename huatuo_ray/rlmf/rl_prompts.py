"""RL prompts: real questions and dialogue histories, each with the real doctor's answer.

From a dialogue artifact of real data (the ``data`` stage's output) or its polished version
(``polish``, which keeps the doctor's original words in ``meta.reference``), every assistant turn
gives a prompt: the turns before it (ending with the patient's turn) and, as the reference, what
the real doctor said there. Prompts are deduplicated on their normalised text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from huatuo_ray.data.similarity import normalise
from huatuo_ray.dialogue import Dialogue


def _real_turns(record: Dialogue) -> list[dict[str, str]]:
    """The dialogue as the real doctor spoke it: polished records keep the original in meta."""
    reference = record.meta.get("reference")
    if isinstance(reference, list):  # a polished dialogue: the original turns
        return [dict(t) for t in reference]
    if isinstance(reference, str):  # a polished single answer: the original answer
        return [dict(t) for t in record.turns[:-1]] + [{"role": "assistant", "content": reference}]
    return [dict(t) for t in record.turns]


def rl_prompts(records: Iterable[Dialogue], last_turn_only: bool = False) -> Iterator[Dialogue]:
    """One prompt record per doctor turn: ``turns`` = the history, ``meta.reference`` = the
    doctor's answer; ``id`` is a hash of the prompt text, so duplicates share it."""
    seen: set[str] = set()
    for record in records:
        real = _real_turns(record)
        positions = [i for i, t in enumerate(real) if t["role"] == "assistant" and i > 0]
        if last_turn_only:
            positions = positions[-1:]
        for i in positions:
            history = real[:i]
            if history[-1]["role"] != "user":
                continue
            key = "\x1f".join(f"{t['role']}:{normalise(t['content'])}" for t in history)
            if key in seen:
                continue
            seen.add(key)
            prompt_id = "rl-" + hashlib.sha256(key.encode()).hexdigest()[:16]
            meta: dict[str, Any] = {
                "reference": real[i]["content"],
                "from_id": record.id,
                "from_source": record.source,
                "turn_index": i,
            }
            yield Dialogue(prompt_id, "rl_prompt", history, meta)
