"""Stage ``score``: the teacher rates pairs of sampled responses, in both orders (RLMF step 3).

    python -m huatuo_ray score --config jobs/tiny/score.yaml

For each prompt of a ``sample`` artifact, pairs of its responses are rated with the appendix-B
prompt against the real doctor's answer and the dialogue history, once with each response first.
A preference is kept only when both orders prefer the same response strictly
(:mod:`~huatuo_ray.rlmf.feedback`). Every judgement, kept or not, is stored with both raw answers
and parsed ratings in ``judgements.jsonl``; the kept ones form the preference artifact. The
manifest reports the consistency rate and the position-bias rate.

Preference records: ``turns`` = the prompt, ``meta`` = ``chosen``, ``rejected``, ``reference``,
``ratings`` (both orders), ``margin`` (mean rating gap) and ``judge`` (the teacher model).
Reruns replay the teacher cache, so a killed run pays for no judgement twice.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from dataclasses import dataclass
from typing import Any

from huatuo_ray import storage
from huatuo_ray.config import input_artifact, option
from huatuo_ray.dialogue import Dialogue, RecordError
from huatuo_ray.rlmf.feedback import FeedbackStats, Judgement
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.client import TeacherClient
from huatuo_ray.teacher.stage import (
    MapResult,
    Outcome,
    StageInput,
    StageOutput,
    TeacherStageConfig,
    ask_parsed,
    run_on_artifact,
)

JUDGEMENTS = "judgements.jsonl"


@dataclass(kw_only=True)
class ScoreConfig(TeacherStageConfig):
    """Mixed feedback: teacher ratings of response pairs, kept when both orders agree."""

    input: str = input_artifact("artifact of the sample stage", made_by="sample")
    pairs_per_prompt: int | None = option(None, help="pairs rated per prompt (None: all k(k-1)/2)")
    seed: int = option(0, help="seed of the pair choice")


async def _rate(teacher: TeacherClient, history, query, reference, a, b, retries) -> dict[str, Any]:
    messages = prompts.rating_messages(history, query, reference, a, b)
    raw: list[str] = []

    def parse(text: str) -> tuple[float, float]:
        raw.append(text)
        return parsers.parse_rating(text)

    try:
        ratings = await ask_parsed(teacher, messages, parse, retries, grammars.rating())
    except RecordError as e:
        return {"ratings": None, "raw": raw, "error": str(e)}
    return {"ratings": list(ratings), "raw": raw}


async def score_record(
    row: dict[str, Any], teacher: TeacherClient, retries: int, pairs: int | None, seed: int
) -> Outcome:
    prompt = Dialogue.from_row(row)
    responses = [r for r in prompt.meta.get("responses", []) if r.strip()]
    if len(responses) < 2:
        return Outcome.reject("fewer than two non-empty responses")
    history, query = prompt.turns[:-1], prompt.turns[-1]["content"]
    reference = prompt.meta["reference"]
    candidates = list(itertools.combinations(range(len(responses)), 2))
    if pairs is not None and pairs < len(candidates):
        candidates = sorted(random.Random(f"{seed}:{prompt.id}").sample(candidates, pairs))

    async def judge(i: int, j: int) -> dict[str, Any]:
        x, y = responses[i], responses[j]
        x_first, y_first = await asyncio.gather(
            _rate(teacher, history, query, reference, x, y, retries),
            _rate(teacher, history, query, reference, y, x, retries),
        )
        return {"x": i, "y": j, "x_first": x_first, "y_first": y_first}

    # All pairs at once: the requests do not depend on each other (one batch round in batch mode).
    judged = list(await asyncio.gather(*(judge(i, j) for i, j in candidates)))
    prompt.meta["judged"] = judged
    return Outcome(prompt)


def preferences(
    prompt: Dialogue, judge: str, stats: FeedbackStats
) -> tuple[list[Dialogue], list[dict]]:
    """The kept preference records of one scored prompt, and all its judgement lines."""
    kept, lines = [], []
    responses = [r for r in prompt.meta["responses"] if r.strip()]
    for pair in prompt.meta["judged"]:
        a, b = pair["x_first"]["ratings"], pair["y_first"]["ratings"]
        judgement = Judgement(tuple(a), tuple(b)) if a and b else None
        stats.add(judgement)
        verdict = judgement.verdict() if judgement else "unparseable"
        lines.append({"prompt_id": prompt.id, **pair, "verdict": verdict})
        if verdict not in ("x", "y"):
            continue
        chosen, rejected = (pair["x"], pair["y"]) if verdict == "x" else (pair["y"], pair["x"])
        kept.append(
            Dialogue(
                f"{prompt.id}-{pair['x']}-{pair['y']}",
                "preference",
                prompt.turns,
                {
                    "chosen": responses[chosen],
                    "rejected": responses[rejected],
                    "reference": prompt.meta["reference"],
                    "ratings": {"x_first": a, "y_first": b, "x": pair["x"], "y": pair["y"]},
                    "margin": judgement.margin(),
                    "judge": judge,
                    "prompt_id": prompt.id,
                },
            )
        )
    return kept, lines


def main(config: ScoreConfig) -> dict:
    def finish(result: MapResult, _: StageInput) -> StageOutput:
        """Preference records from the judged prompts; every judgement to ``judgements.jsonl``."""
        stats, kept, lines = FeedbackStats(), [], []
        for prompt in sorted(result.records, key=lambda r: r.id):
            records, judged = preferences(prompt, config.teacher.model, stats)
            kept += records
            lines += judged
        storage.write_bytes(
            storage.join(config.output, JUDGEMENTS),
            "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode(),
        )
        # A pair whose rating never parsed is this stage's reject: it counts against
        # max_reject_fraction with the prompts the map rejected.
        failed = stats.unparseable + len(result.rejects)
        return StageOutput(
            kept,
            {"feedback": stats.summary(), "judgements": JUDGEMENTS},
            failed=(failed, stats.pairs + len(result.rejects), "pairs unrated or prompts rejected"),
        )

    return run_on_artifact(
        config,
        "score",
        config.input,
        score_record,
        fn_kwargs={"pairs": config.pairs_per_prompt, "seed": config.seed},
        finish=finish,
    )
