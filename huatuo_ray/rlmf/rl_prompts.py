"""RL prompts: real questions and dialogue histories, each with the real doctor's answer.

From a dialogue artifact of real data (the ``data`` stage's output) or its polished version
(``polish``, which keeps the doctor's original words in ``meta.reference``), every assistant turn
gives a prompt: the turns before it (ending with the patient's turn) and, as the reference, what
the real doctor said there. Prompts are deduplicated on their normalised text.

:class:`PromptStream` serves them to the ``ppo`` recipe: tokenised, too-long ones rejected, in a
seeded order per epoch, with a position to resume from. With ``rollout.mode: consultation`` it
serves real cases instead (:func:`case_prompts`): each the brief of a patient, for whole
consultations (:mod:`~huatuo_ray.rlmf.consultation`).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from huatuo_ray import artifacts
from huatuo_ray.data.similarity import normalise
from huatuo_ray.dialogue import Dialogue, encode_prompt

if TYPE_CHECKING:
    from huatuo_ray.rlmf.ppo_config import PPOConfig

log = logging.getLogger(__name__)


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


def case_prompts(
    records: Iterable[Dialogue], patient_prompt: str = "consult"
) -> Iterator[Dialogue | dict[str, str]]:
    """One consultation prompt per real case (``data --source meddialog_cases``, or MedDialog
    records, whose description is the case): ``meta.brief`` = the patient's system prompt with
    the case (``consult``: the evaluation's; ``dialogues``: A.2's), ``meta.reference`` = the
    real doctor's consultation as text (or, without one, the doctor's diagnosis and advice). A
    record with no case text comes out as a reject ``{"id", "reason"}``."""
    from huatuo_ray.teacher import prompts
    from huatuo_ray.teacher.agents import case_and_diagnosis

    brief = (
        prompts.eval_patient_system_prompt
        if patient_prompt == "consult"
        else prompts.patient_system_prompt
    )
    seen: set[str] = set()
    for record in records:
        case, diagnosis = case_and_diagnosis(record.meta)
        if not case:
            yield {"id": record.id, "reason": "no case description for the patient"}
            continue
        if record.id in seen:
            continue
        seen.add(record.id)
        # The real consultation: HuatuoGPT-II's cases carry it; a MedDialog record is one.
        real = record.meta.get("real_dialogue") or (
            record.turns if any(t["role"] == "assistant" for t in record.turns) else None
        )
        reference = prompts.render_conversation(real, "Patient", "Doctor") if real else diagnosis
        meta: dict[str, Any] = {
            "reference": reference,
            "brief": brief(case),
            "case": case,
            "from_id": record.id,
            "department": record.meta.get("department") or record.meta.get("faculty"),
            "consultation": True,
        }
        yield Dialogue(record.id, "rl_case", [{"role": "user", "content": case}], meta)


@dataclass
class Prompt:
    """One RL prompt, tokenised; a group's k-th answer asks it as ``id#k``."""

    id: str
    ids: list[int]
    info: dict[str, Any] = field(default_factory=dict)  # prompt text, reference, meta (rewards)

    def answer(self, k: int) -> Prompt:
        """The prompt as asked for its k-th answer of a group (its own sampling seed)."""
        return self if k == 0 else Prompt(f"{self.id}#{k}", self.ids, self.info)

    def seed(self, base: int, iteration: int, draw: str = "") -> int:
        """The sampling seed of this prompt in ``iteration``; ``draw`` (where in the stream it
        was drawn) makes it differ between draws of the same prompt in one iteration."""
        from huatuo_ray.inference.generation import prompt_seed

        return prompt_seed(base, f"{iteration}:{self.id}" + (f"@{draw}" if draw else ""))


class PromptStream:
    """The RL prompts in a seeded order per epoch; ``position`` = (epoch, index) resumes it."""

    def __init__(self, config: PPOConfig, tokenizer: Any):
        self.seed = config.seed
        self.tokenizer = tokenizer  # consultations tokenise their turns as they come
        self.prompts: list[Prompt] = []
        self.rejects: list[dict[str, str]] = []
        records = (d for uri in config.inputs for d in artifacts.read_dialogues(uri))
        if config.rollout.mode == "consultation":
            self._read_cases(records, config.rollout.consultation.patient_prompt)
        else:
            self._read_prompts(records, config, tokenizer)
        if not self.prompts:
            raise ValueError(f"ppo: no usable prompts in {config.inputs}")
        log.warning("ppo: %d prompts (%d rejected)", len(self.prompts), len(self.rejects))
        self.position = [0, 0]

    def _read_prompts(self, records: Iterable[Dialogue], config: PPOConfig, tokenizer: Any) -> None:
        for prompt in rl_prompts(records, config.last_turn_only):
            ids = encode_prompt(tokenizer, prompt.turns)
            if len(ids) > config.max_prompt_tokens:
                self.rejects.append(
                    {"id": prompt.id, "reason": f"prompt of {len(ids)} tokens > max_prompt_tokens"}
                )
                continue
            info = {
                "prompt": prompt.turns[-1]["content"],
                "reference": prompt.meta.get("reference", ""),
                "meta": {**prompt.meta, "id": prompt.id, "turns": prompt.turns},
            }
            self.prompts.append(Prompt(prompt.id, ids, info))

    def _read_cases(self, records: Iterable[Dialogue], patient_prompt: str) -> None:
        """Cases for consultations: no token ids (the patient opens each consultation)."""
        for case in case_prompts(records, patient_prompt):
            if isinstance(case, dict):
                self.rejects.append(case)
                continue
            info = {"prompt": case.turns[0]["content"], "reference": case.meta["reference"],
                    "meta": {**case.meta, "id": case.id}}  # fmt: skip
            self.prompts.append(Prompt(case.id, [], info))

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[Prompt]:
        batch = []
        epoch, index = self.position
        order = self._order(epoch)
        while len(batch) < size:
            if index == len(order):
                epoch, index = epoch + 1, 0
                order = self._order(epoch)
            batch.append(self.prompts[order[index]])
            index += 1
        self.position = [epoch, index]
        return batch
