"""Stage ``polish``: real doctors' answers and dialogues rewritten by the teacher (A.3 / A.4).

    python -m huatuo_ray polish --config jobs/tiny/polish.yaml

Input: a dataset artifact of real data (the ``data`` stage's output for Huatuo-26M, cMedQA2,
webMedQA, MedDialog...). A record with one question and one answer is rewritten with the A.3
prompt (the doctor's answer as the reference); a longer dialogue with the A.4 prompt, and the
result must keep the number, order and roles of the turns, else it is rejected with the reason.
The real doctor's words stay in ``meta.reference`` for RLMF and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from huatuo_ray.dialogue import Dialogue, RecordError, turn
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.client import TeacherClient
from huatuo_ray.teacher.stage import ArtifactStageConfig, Outcome, ask_parsed, run_on_artifact


@dataclass(kw_only=True)
class PolishConfig(ArtifactStageConfig):
    """Rewrite real doctor answers and dialogues with the teacher (``input``: an artifact of real
    single-turn answers or dialogues)."""


async def polish_record(row: dict[str, Any], teacher: TeacherClient, retries: int) -> Outcome:
    """One input record -> its polished version (or a reject reason)."""
    original = Dialogue.from_row(row)
    spoken = original.spoken()
    if not any(t["role"] == "assistant" for t in spoken):
        return Outcome.reject("no doctor reply to polish")
    if len(spoken) == 2 and [t["role"] for t in spoken] == ["user", "assistant"]:
        question, answer = spoken[0]["content"], spoken[1]["content"]
        messages = prompts.polish_answer_messages(question, answer)
        polished = await ask_parsed(
            teacher, messages, parsers.parse_answer, retries, grammars.answer()
        )
        turns = [turn("user", question), turn("assistant", polished)]
        source, reference = "polish_single", answer
    else:
        messages = prompts.polish_dialogue_messages(original.turns)
        turns = await ask_parsed(
            teacher,
            messages,
            lambda text: parsers.parse_polished_dialogue(text, original.turns),
            retries,
            grammars.polished_dialogue(original.turns),
        )
        source, reference = "polish_dialogue", [dict(t) for t in original.turns]
    record = Dialogue(
        id=f"polish-{original.id}",
        source=source,
        turns=turns,
        meta={"from_id": original.id, "from_source": original.source, "reference": reference},
    )
    try:
        return Outcome(record.validate())
    except RecordError as e:
        return Outcome.reject(f"polished record invalid: {e}")


def main(config: PolishConfig) -> dict:
    return run_on_artifact(config, "polish", config.input, polish_record)
