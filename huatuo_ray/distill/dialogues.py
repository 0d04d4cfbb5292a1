"""Stage ``dialogues``: two teacher agents play a consultation from a real case (paper A.2).

    python -m huatuo_ray dialogues --config jobs/tiny/dialogues.yaml

The patient agent sees the real case (MedDialog's description); the doctor agent sees only the
final diagnosis. They alternate, patient first, until the patient says goodbye or ``max_turns``
exchanges are done. Each agent's private input is only in its own system prompt: the other agent
receives nothing but the dialogue itself. The patient's goodbye ends the dialogue and is not kept
as a turn (an unanswered patient turn teaches the model nothing).

Input: a dataset artifact from ``data --source meddialog_cases`` (``meta.medical_case``,
``meta.doctor_diagnosis``) or ``data --source meddialog`` (``meta.description``,
``meta.diagnosis``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from huatuo_ray.config import option
from huatuo_ray.dialogue import Dialogue
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.agents import Turns, case_and_diagnosis, consultation, patient_turn
from huatuo_ray.teacher.client import TeacherClient
from huatuo_ray.teacher.stage import (
    ArtifactStageConfig,
    Outcome,
    StageOutput,
    ask_parsed,
    count_by,
    run_on_artifact,
)


@dataclass(kw_only=True)
class DialoguesConfig(ArtifactStageConfig):
    """Distil multi-turn consultations with a patient agent and a doctor agent (``input``: an
    artifact of real cases, meddialog_cases or meddialog)."""

    max_turns: int = option(6, help="most patient/doctor exchanges in one consultation")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_turns < 1:
            raise ValueError("max_turns must be at least 1")


async def consult_record(
    row: dict[str, Any], teacher: TeacherClient, max_turns: int, retries: int
) -> Outcome:
    case_record = Dialogue.from_row(row)
    case, diagnosis = case_and_diagnosis(case_record.meta)
    if not case or not diagnosis:
        return Outcome.reject("case without a description or a diagnosis")
    patient_system = prompts.patient_system_prompt(case)
    doctor_system = prompts.doctor_system_prompt(diagnosis)

    async def doctor(turns: Turns) -> str:
        view = prompts.doctor_messages(doctor_system, turns)
        return await ask_parsed(teacher, view, parsers.parse_answer, retries, grammars.answer())

    turns, ended = await consultation(
        lambda turns: patient_turn(teacher, patient_system, turns, retries), doctor, max_turns
    )
    record = Dialogue(
        id=f"dialogue-{case_record.id}",
        source="distilled_dialogue",
        turns=turns,
        meta={
            "from_id": case_record.id,
            "department": case_record.meta.get("department"),
            "diagnosis": diagnosis,
            "ended": ended,
        },
    )
    return Outcome(record.validate())


def main(config: DialoguesConfig) -> dict:
    return run_on_artifact(
        config,
        "dialogues",
        config.input,
        consult_record,
        fn_kwargs={"max_turns": config.max_turns},
        finish=lambda result, _: StageOutput(
            result.records, {"ended": count_by(result.records, "ended")}
        ),
    )
