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
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import artifacts, storage
from huatuo_ray.chat import Dialogue, RecordError
from huatuo_ray.config import ClusterConfig, TeacherConfig, option, to_dict
from huatuo_ray.distill.common import WorkersConfig, already_complete, ask_parsed, limiter_for_job
from huatuo_ray.distill.pipeline import Outcome, read_input_rows, run_teacher_map
from huatuo_ray.rlmf.feedback import FeedbackStats, Judgement
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.client import TeacherClient

JUDGEMENTS = "judgements.jsonl"


@dataclass
class ScoreConfig:
    """Mixed feedback: teacher ratings of response pairs, kept when both orders agree."""

    input: str = option(help="artifact of the sample stage")
    output: str = option(help="preference artifact to write (its _teacher_cache makes reruns free)")
    pairs_per_prompt: int | None = option(None, help="pairs rated per prompt (None: all k(k-1)/2)")
    seed: int = option(0, help="seed of the pair choice")
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    limit: int | None = option(None, help="score only the first N prompts")
    overwrite: bool = option(False, help="redo a complete artifact (cached answers are reused)")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


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
    judged = []
    for i, j in candidates:
        x, y = responses[i], responses[j]
        x_first, y_first = await asyncio.gather(
            _rate(teacher, history, query, reference, x, y, retries),
            _rate(teacher, history, query, reference, y, x, retries),
        )
        judged.append({"x": i, "y": j, "x_first": x_first, "y_first": y_first})
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
    from huatuo_ray.runtime import connect

    connect(config.cluster, "score")
    if (done := already_complete(config.output, config.overwrite)) is not None:
        return done
    rows = read_input_rows(config.input, config.limit)
    result = run_teacher_map(
        rows,
        "huatuo_ray.rlmf.score.score_record",
        config.teacher,
        config.output,
        workers=config.workers.num_workers,
        batch_size=config.workers.batch_size,
        fn_kwargs={
            "retries": config.workers.max_parse_retries,
            "pairs": config.pairs_per_prompt,
            "seed": config.seed,
        },
        limiter_name=limiter_for_job(config.teacher),
        stage="score",
    )
    stats = FeedbackStats()
    writer = artifacts.DatasetWriter(config.output)
    lines: list[dict] = []
    for prompt in sorted(result.records, key=lambda r: r.id):
        kept, judged = preferences(prompt, config.teacher.model, stats)
        for record in kept:
            writer.write(record)
        lines += judged
    for prompt_id, reason in sorted(result.rejects):
        writer.reject(prompt_id, reason)
    storage.write_bytes(
        storage.join(config.output, JUDGEMENTS),
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode(),
    )
    return writer.finish(
        "score",
        to_dict(config),
        inputs=[artifacts.input_summary(config.input)],
        feedback=stats.summary(),
        judgements=JUDGEMENTS,
        teacher={
            "base_url": config.teacher.base_url,
            "model": config.teacher.model,
            "usage": result.usage.to_dict(),
        },
    )
