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

from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import artifacts
from huatuo_ray.chat import Dialogue, turn
from huatuo_ray.config import ClusterConfig, TeacherConfig, option, to_dict
from huatuo_ray.distill.common import WorkersConfig, already_complete, ask_parsed, limiter_for_job
from huatuo_ray.distill.pipeline import Outcome, read_input_rows, run_teacher_map, write_result
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.client import TeacherClient


@dataclass
class DialoguesConfig:
    """Distil multi-turn consultations with a patient agent and a doctor agent."""

    input: str = option(help="dataset artifact of real cases (meddialog_cases or meddialog)")
    output: str = option(help="artifact folder to write (its _teacher_cache makes reruns free)")
    max_turns: int = option(6, help="most patient/doctor exchanges in one consultation")
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    limit: int | None = option(None, help="use only the first N cases")
    overwrite: bool = option(False, help="redo a complete artifact (cached answers are reused)")
    shard_rows: int = option(10_000, help="records per Parquet shard")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError("max_turns must be at least 1")


def case_and_diagnosis(meta: dict[str, Any]) -> tuple[str, str]:
    """The patient's private case text and the doctor's private diagnosis of a real record."""
    case = meta.get("medical_case") or ""
    if not case and isinstance(meta.get("description"), dict):
        case = "\n".join(f"{k}：{v}" for k, v in meta["description"].items() if v)
    diagnosis = meta.get("doctor_diagnosis") or meta.get("diagnosis") or ""
    return str(case).strip(), str(diagnosis).strip()


async def consult_record(
    row: dict[str, Any], teacher: TeacherClient, max_turns: int, retries: int
) -> Outcome:
    case_record = Dialogue.from_row(row)
    case, diagnosis = case_and_diagnosis(case_record.meta)
    if not case or not diagnosis:
        return Outcome.reject("case without a description or a diagnosis")
    patient_system = prompts.patient_system_prompt(case)
    doctor_system = prompts.doctor_system_prompt(diagnosis)
    turns: list[dict[str, str]] = []
    ended = "turn_limit"
    for _ in range(max_turns):
        patient_view = prompts.patient_messages(patient_system, turns)
        said = await ask_parsed(
            teacher, patient_view, parsers.parse_answer, retries, grammars.answer()
        )
        if turns and parsers.is_goodbye(said):
            ended = "goodbye"
            break
        turns.append(turn("user", said))
        doctor_view = prompts.doctor_messages(doctor_system, turns)
        turns.append(
            turn(
                "assistant",
                await ask_parsed(
                    teacher, doctor_view, parsers.parse_answer, retries, grammars.answer()
                ),
            )
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
    from huatuo_ray.runtime import connect

    connect(config.cluster, "dialogues")
    if (done := already_complete(config.output, config.overwrite)) is not None:
        return done
    rows = read_input_rows(config.input, config.limit)
    result = run_teacher_map(
        rows,
        "huatuo_ray.distill.dialogues.consult_record",
        config.teacher,
        config.output,
        workers=config.workers.num_workers,
        batch_size=config.workers.batch_size,
        fn_kwargs={"max_turns": config.max_turns, "retries": config.workers.max_parse_retries},
        limiter_name=limiter_for_job(config.teacher),
        stage="dialogues",
    )
    ended: dict[str, int] = {}
    for record in result.records:
        ended[record.meta["ended"]] = ended.get(record.meta["ended"], 0) + 1
    return write_result(
        result,
        config.output,
        "dialogues",
        to_dict(config),
        [artifacts.input_summary(config.input)],
        config.teacher,
        config.shard_rows,
        extra={"inputs_read": len(rows), "ended": ended},
    )
