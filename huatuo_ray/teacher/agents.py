"""The teacher as an agent in a consultation: the patient half, shared by ``dialogues`` (the
teacher plays both sides, paper A.2) and ``consult`` (the teacher is the patient, the model under
test the doctor)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from huatuo_ray.dialogue import turn
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.client import TeacherClient
from huatuo_ray.teacher.stage import ask_parsed

Turns = list[dict[str, str]]


def case_and_diagnosis(meta: dict[str, Any]) -> tuple[str, str]:
    """The patient's private case text and the doctor's private diagnosis of a real record."""
    case = meta.get("medical_case") or ""
    if not case and isinstance(meta.get("description"), dict):
        case = "\n".join(f"{k}：{v}" for k, v in meta["description"].items() if v)
    diagnosis = meta.get("doctor_diagnosis") or meta.get("diagnosis") or ""
    return str(case).strip(), str(diagnosis).strip()


async def patient_turn(
    teacher: TeacherClient, system: str, turns: Turns, retries: int, seed: int | None = None
) -> str:
    """What the teacher, as the patient with ``system`` as its brief, says next. ``seed``: the
    request's sampling seed (several consultations of one case: each its own patient, and each
    answer cached apart)."""
    view = prompts.patient_messages(system, turns)
    sampling = {"seed": seed} if seed is not None else {}
    return await ask_parsed(
        teacher, view, parsers.parse_answer, retries, grammars.answer(), **sampling
    )


async def consultation(
    patient: Callable[[Turns], Awaitable[str]],
    doctor: Callable[[Turns], Awaitable[str]],
    max_turns: int,
) -> tuple[Turns, str]:
    """Patient and doctor alternate, the patient first, until the patient says goodbye (after
    the first exchange) or ``max_turns`` exchanges are done. Returns the turns in the doctor's
    view (user = patient) and how it ended: ``goodbye`` or ``turn_limit``."""
    turns: Turns = []
    for _ in range(max_turns):
        said = await patient(turns)
        if turns and parsers.is_goodbye(said):
            return turns, "goodbye"
        turns.append(turn("user", said))
        turns.append(turn("assistant", await doctor(turns)))
    return turns, "turn_limit"
