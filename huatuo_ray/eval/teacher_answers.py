"""Stage ``teacher-answers``: the teacher's own answers to the evaluation questions.

    python -m huatuo_ray teacher-answers --config jobs/paper/teacher-answers.yaml

The paper compared HuatuoGPT with ChatGPT on the 100 KUAKE-QIC questions (table 4). This stage
asks the teacher endpoint (ChatGPT, or any OpenAI-compatible model) each question exactly as a
user would, with no system prompt, and stores the conversation ending with its answer: the
``answers`` artifact that ``judge`` reads for the baseline side. Records keep the question's id
and meta (``meta.qid``, ``meta.label``), so the judge pairs them with the model's answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from huatuo_ray.dialogue import Dialogue, turn
from huatuo_ray.teacher import parsers
from huatuo_ray.teacher.client import TeacherClient
from huatuo_ray.teacher.stage import ArtifactStageConfig, Outcome, ask_parsed, run_on_artifact


@dataclass(kw_only=True)
class TeacherAnswersConfig(ArtifactStageConfig):
    """Collect the teacher's answers to evaluation questions, the judge's baseline (``input``: an
    artifact of questions, records ending with a user turn)."""


async def answer_record(row: dict[str, Any], teacher: TeacherClient, retries: int) -> Outcome:
    """One question -> the conversation with the teacher's answer appended."""
    question = Dialogue.from_row(row)
    spoken = question.spoken()
    if not spoken or spoken[-1]["role"] != "user":
        return Outcome.reject("the record does not end with a question (a user turn)")
    answer = await ask_parsed(teacher, spoken, parsers.parse_answer, retries)
    record = Dialogue(
        id=question.id,
        source="teacher_answers",
        turns=[*spoken, turn("assistant", answer)],
        meta={**question.meta, "answered_by": teacher.config.model},
    )
    return Outcome(record.validate())


def main(config: TeacherAnswersConfig) -> dict:
    return run_on_artifact(config, "teacher-answers", config.input, answer_record)
