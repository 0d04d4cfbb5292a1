"""Stage ``judge``: the teacher compares two models' answers pairwise (paper appendix D, tables 4-5).

    python -m huatuo_ray judge --config jobs/tiny/judge.yaml

Each candidate is either a model (``model``: it answers ``questions`` greedily, as in
``benchmark``) or stored conversations (``answers``: an artifact whose records end with the
candidate's answer, e.g. the ``consult`` stage's dialogues or another model's answers read with
``data --source huatuo_answers``). Records of A and B are matched on ``match_on`` (``id`` or
``meta.<key>``) and grouped by ``category`` (KUAKE-QIC intent for single-turn questions, the
department for consultations).

Position: for each pair a seeded coin decides whether A is shown as "Assistant 1" or as
"Assistant 2"; the choice is stored with the verdict, and a verdict on swapped positions is
credited to the model that was in that position. With ``both_orders`` each pair is judged in both
orders and only verdicts that agree count (the others are ``inconsistent``, reported apart).

Output: an artifact with one record per judged pair (both conversations, the positions, every raw
verdict, A's outcome), ``table.md`` and ``results.json`` with win/tie/loss per category and overall.
Teacher answers are cached in the output folder: a rerun pays for nothing twice.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import artifacts, storage
from huatuo_ray.config import input_artifact, option
from huatuo_ray.dialogue import Dialogue, encode_prompt
from huatuo_ray.eval.answers import conversation, field_of, generate_answers
from huatuo_ray.eval.tally import markdown, tally
from huatuo_ray.inference.batch import EnginePool
from huatuo_ray.inference.generation import EngineConfig
from huatuo_ray.models.fetch import local_model_path
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.client import TeacherClient
from huatuo_ray.teacher.stage import (
    MapResult,
    Outcome,
    StageInput,
    StageOutput,
    TeacherStageConfig,
    ask_parsed,
    run_teacher_stage,
)


@dataclass
class Candidate:
    """One side of the comparison: a model, or stored conversations."""

    name: str = option(help="name in the tables, e.g. HuatuoGPT")
    model: str | None = option(
        None, help="model folder or hub id: answers ``questions``", input="model"
    )
    answers: str | None = option(
        None, help="artifact of conversations ending with its answers", input="artifact"
    )

    def __post_init__(self) -> None:
        if (self.model is None) == (self.answers is None):
            raise ValueError(f"candidate {self.name!r}: give exactly one of model and answers")


@dataclass(kw_only=True)
class JudgeConfig(TeacherStageConfig):
    """Pairwise comparison of two models by the teacher (appendix D)."""

    a: Candidate = option(help="model A (outcomes are A's: win = A judged better)")
    b: Candidate = option(help="model B")
    questions: str | None = input_artifact(
        "artifact of questions, for candidates given a model", made_by="data", default=None
    )
    match_on: str = option("id", help="pair records on id or meta.<key>")
    category: str = option("meta.label", help="group results by this field (id, meta.<key>)")
    both_orders: bool = option(False, help="judge each pair in both orders; count agreements only")
    seed: int = option(0, help="seed of the per-pair position switch")
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_new_tokens: int = option(256, help="longest generated answer")
    max_prompt_tokens: int = option(1024, help="longer questions are rejected")
    engines: int = option(1, help="generation engines (Ray Data actors)")
    gpus_per_engine: float = option(0, help="GPUs per engine")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.a.model or self.b.model) and not self.questions:
            raise ValueError("a candidate given as a model needs questions")


def a_outcome(verdict: parsers.Verdict, a_first: bool) -> str:
    """A's outcome from a verdict on "Assistant 1 against Assistant 2"."""
    if verdict == "equal":
        return "tie"
    first_won = verdict == "better"
    return "win" if first_won == a_first else "loss"


async def judge_pair(
    row: dict[str, Any], teacher: TeacherClient, both_orders: bool, retries: int
) -> Outcome:
    record = Dialogue.from_row(row)
    meta = record.meta
    a, b = meta["conversation_a"], meta["conversation_b"]
    orders = [meta["a_first"]] + ([not meta["a_first"]] if both_orders else [])
    verdicts = []
    for a_first in orders:
        first, second = (a, b) if a_first else (b, a)
        verdict = await ask_parsed(
            teacher,
            prompts.judge_messages(first, second),
            parsers.parse_verdict,
            retries,
            grammars.verdict(),
        )
        verdicts.append({"a_first": a_first, "verdict": verdict, "a": a_outcome(verdict, a_first)})
    outcomes = {v["a"] for v in verdicts}
    outcome = outcomes.pop() if len(outcomes) == 1 else "inconsistent"
    return Outcome(
        Dialogue(
            record.id, "judge", record.turns, {**meta, "verdicts": verdicts, "outcome": outcome}
        )
    )


def _by_key(records: list[Dialogue], match_on: str) -> dict[str, Dialogue]:
    return {str(field_of(r, match_on)): r for r in records if field_of(r, match_on) is not None}


def candidate_records(
    candidate: Candidate, config: JudgeConfig, questions: list[Dialogue]
) -> list[Dialogue]:
    """Stored conversations, or the model's answers to the questions (``meta.prediction``)."""
    if candidate.answers is not None:
        return list(artifacts.read_dialogues(candidate.answers))
    from transformers import AutoTokenizer

    path = os.path.abspath(candidate.model) if os.path.exists(candidate.model) else candidate.model
    tokenizer = AutoTokenizer.from_pretrained(local_model_path(path))  # engines fetch too
    rows = []
    for q in questions:
        prompt = q.turns[:-1] if q.turns[-1]["role"] == "assistant" else q.turns
        ids = encode_prompt(tokenizer, prompt)
        if len(ids) <= config.max_prompt_tokens:
            row = Dialogue(q.id, q.source, prompt, q.meta).to_row()
            rows.append({**row, "prompt_ids": ids, "seed": 0})
    pool = EnginePool(config.engines, config.gpus_per_engine, config.workers.batch_size)
    answered = generate_answers(rows, path, config.engine, config.max_new_tokens, pool)
    records = []
    for row in answered:
        meta = json.loads(row["meta"])
        records.append(Dialogue(row["id"], row["source"], list(row["turns"]), meta))
    return records


def pair_rows(config: JudgeConfig) -> StageInput:
    """One row per key both sides have (the first ``limit``), with a seeded position coin."""
    questions = list(artifacts.read_dialogues(config.questions)) if config.questions else []
    side_a = _by_key(candidate_records(config.a, config, questions), config.match_on)
    side_b = _by_key(candidate_records(config.b, config, questions), config.match_on)
    keys = sorted(set(side_a) & set(side_b))[: config.limit]
    rows = []
    for key in keys:
        ra, rb = side_a[key], side_b[key]
        a_first = random.Random(f"{config.seed}:{key}").random() < 0.5
        meta = {
            "key": key,
            "category": field_of(ra, config.category) or field_of(rb, config.category),
            "a": config.a.name,
            "b": config.b.name,
            "a_id": ra.id,
            "b_id": rb.id,
            "conversation_a": conversation(ra),
            "conversation_b": conversation(rb),
            "a_first": a_first,
        }
        rows.append(Dialogue(f"judge-{key}", "judge", conversation(ra), meta).to_row())
    unpaired = {"a": len(set(side_a) - set(side_b)), "b": len(set(side_b) - set(side_a))}
    inputs = (config.a.answers, config.b.answers, config.questions)
    return StageInput(
        rows, [artifacts.input_summary(p) for p in inputs if p], extra={"unpaired": unpaired}
    )


def main(config: JudgeConfig) -> dict[str, Any]:
    def finish(result: MapResult, given: StageInput) -> StageOutput:
        """Win/tie/loss per category into ``results.json`` and ``table.md``."""
        table = tally([(str(r.meta["category"]), r.meta["outcome"]) for r in result.records])
        results = {
            "a": config.a.name,
            "b": config.b.name,
            "category": config.category,
            "both_orders": config.both_orders,
            "table": table,
            "pairs": len(given.rows),
            "unpaired": given.extra["unpaired"],
            "a_shown_first": sum(json.loads(r["meta"])["a_first"] for r in given.rows),
        }
        storage.write_json(storage.join(config.output, "results.json"), results)
        storage.write_bytes(
            storage.join(config.output, "table.md"),
            markdown(table, config.a.name, config.b.name, config.category).encode(),
        )
        return StageOutput(result.records, {"results": results})

    return run_teacher_stage(
        config,
        "judge",
        lambda: pair_rows(config),
        judge_pair,
        fn_kwargs={"both_orders": config.both_orders},
        finish=finish,
    )
