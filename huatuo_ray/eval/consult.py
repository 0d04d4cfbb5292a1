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
starts it for the run as a Ray actor (:mod:`~huatuo_ray.inference.server_actor`) placed by the
resources ``doctor_server`` asks for, with its engine settings (dtype, memory share, eager mode);
the actor serves on its node's address, the workers reach it there, and it is stopped at the end.
The manifest's ``doctor_server`` says where it ran.

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

from huatuo_ray.config import TeacherConfig, input_artifact, option
from huatuo_ray.dialogue import Dialogue, RecordError
from huatuo_ray.inference.server_actor import ModelServerConfig
from huatuo_ray.models.fetch import local_model_path
from huatuo_ray.teacher import prompts
from huatuo_ray.teacher.agents import Turns, case_and_diagnosis, consultation, patient_turn
from huatuo_ray.teacher.client import TeacherClient
from huatuo_ray.teacher.stage import (
    Outcome,
    StageOutput,
    TeacherStageConfig,
    count_by,
    run_on_artifact,
)


@dataclass(kw_only=True)
class ConsultConfig(TeacherStageConfig):
    """Consultations between a teacher-played patient and the model under test."""

    cases: str = input_artifact(
        "dataset artifact of real cases (meddialog_cases or meddialog)", made_by="data"
    )
    name: str = option("model", help="the doctor's name in the outputs and tables")
    doctor: TeacherConfig = field(default_factory=TeacherConfig)
    doctor_model: str | None = option(
        None,
        help="a model folder: serve it from a Ray actor for the run and use it as the doctor",
        input="model",
    )
    doctor_server: ModelServerConfig = field(default_factory=ModelServerConfig)
    max_turns: int = option(2, help="patient/doctor exchanges (HuatuoGPT-II's data: 2)")

    def __post_init__(self) -> None:
        super().__post_init__()
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
def doctor_endpoint(
    config: ConsultConfig, served: dict[str, Any] | None = None
) -> Iterator[dict[str, TeacherConfig]]:
    """The doctor's endpoint: as configured, or ``doctor_model`` served by a Ray actor for the
    run (where it landed is put into ``served``)."""
    if config.doctor_model is None:
        yield {"doctor": config.doctor}
        return
    from huatuo_ray.inference.server_actor import model_endpoint

    path = os.path.abspath(local_model_path(config.doctor_model))  # a URI: fetched first
    with model_endpoint(path, config.name, config.doctor_server) as where:
        if served is not None:
            served.update(where.to_dict())
        yield {
            "doctor": dataclasses.replace(
                config.doctor, base_url=where.base_url, model=config.name, api_key_env=""
            )
        }


def main(config: ConsultConfig) -> dict[str, Any]:
    served: dict[str, Any] = {}

    def finish(result: Any, _: Any) -> StageOutput:
        extra = {"ended": count_by(result.records, "ended"), "doctor": config.name}
        return StageOutput(
            result.records, {**extra, **({"doctor_server": served} if served else {})}
        )

    return run_on_artifact(
        config,
        "consult",
        config.cases,
        consult_case,
        fn_kwargs={"max_turns": config.max_turns, "name": config.name},
        finish=finish,
        agents=lambda: doctor_endpoint(config, served),
    )
