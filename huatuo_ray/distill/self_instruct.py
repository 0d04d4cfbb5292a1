"""Stage ``self-instruct``: role-enhanced self-instruct (paper A.1), distilled instructions.

    python -m huatuo_ray self-instruct --config jobs/tiny/self-instruct.yaml

Two steps:

1. **Instructions, in rounds, from the driver.** Each request shows the teacher a few seed
   triplets (and, as self-instruct does, a couple it generated earlier) and asks for 20 new
   <role, instruction, input> triplets (A.1 prompt 1). A triplet is kept only if its question's
   ROUGE-L similarity to every seed and everything kept so far stays below the threshold. This
   filter is sequential by nature, so the rounds run in the driver (the requests of a round run
   concurrently); everything is seeded, so a rerun asks the same questions and replays the cache.
2. **Answers, on Ray Data.** Every kept instruction is answered with the role-enhanced prompt
   (A.1 prompt 2) by the teacher workers.

Seeds: ``huatuo_ray/distill/seeds.jsonl`` (written for this project: roles x use cases) or your
own JSONL of ``{role, instruction, input}`` objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huatuo_ray import storage
from huatuo_ray.config import option
from huatuo_ray.data.similarity import NearDuplicateIndex
from huatuo_ray.dialogue import Dialogue, RecordError, turn
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.cache import ResponseCache
from huatuo_ray.teacher.client import TeacherClient, TeacherError
from huatuo_ray.teacher.parsers import Triplet
from huatuo_ray.teacher.stage import (
    CACHE_DIR,
    Outcome,
    StageInput,
    TeacherStageConfig,
    ask_parsed,
    limiter_for_job,
    run_teacher_stage,
)

log = logging.getLogger(__name__)
BUNDLED_SEEDS = str(Path(__file__).with_name("seeds.jsonl"))


@dataclass(kw_only=True)
class SelfInstructConfig(TeacherStageConfig):
    """Generate medical instructions with role-enhanced self-instruct and answer them."""

    seeds: str = option(
        BUNDLED_SEEDS, help="JSONL of seed triplets {role, instruction, input}", input="file"
    )
    num_instructions: int = option(100, help="instructions to generate and answer")
    triplets_per_request: int = option(20, help="triplets asked for in one request (paper: 20)")
    requests_per_round: int = option(8, help="generation requests run at once in one round")
    seed_examples: int = option(3, help="seed triplets shown in each request")
    generated_examples: int = option(2, help="earlier generated triplets shown in each request")
    max_rounds: int = option(100, help="stop generating after this many rounds")
    similarity_threshold: float = option(
        0.7, help="drop a question with ROUGE-L >= this to a kept one"
    )
    seed: int = option(0, help="seed of the example sampling")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.num_instructions, self.triplets_per_request, self.requests_per_round) < 1:
            raise ValueError(
                "num_instructions, triplets_per_request, requests_per_round must be >= 1"
            )
        if not 0 < self.similarity_threshold <= 1:
            raise ValueError("similarity_threshold must be in (0, 1]")


def load_seeds(uri: str) -> list[Triplet]:
    seeds = []
    for n, line in enumerate(storage.read_bytes(uri).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            seeds.append(Triplet(obj.get("role", ""), obj["instruction"], obj.get("input", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{uri}:{n}: not a seed triplet ({e})") from None
    if not seeds:
        raise ValueError(f"{uri}: no seed triplets")
    return seeds


@dataclass
class GenerationStats:
    rounds: int = 0
    requests: int = 0
    unparseable: int = 0
    failed_requests: int = 0
    triplets: int = 0
    near_duplicates: int = 0
    surplus: int = 0  # parsed after the target was reached
    kept: int = 0


async def generate_instructions(
    config: SelfInstructConfig, client: TeacherClient, seeds: list[Triplet]
) -> tuple[list[Triplet], GenerationStats]:
    index = NearDuplicateIndex(config.similarity_threshold)
    for s in seeds:
        index.insert(s.question)
    kept: list[Triplet] = []
    stats = GenerationStats()
    while len(kept) < config.num_instructions and stats.rounds < config.max_rounds:
        requests = []
        for i in range(config.requests_per_round):
            rng = random.Random(f"{config.seed}:{stats.rounds}:{i}")
            examples = rng.sample(seeds, min(config.seed_examples, len(seeds)))
            examples += rng.sample(kept, min(config.generated_examples, len(kept)))
            messages = prompts.self_instruct_messages(examples, n=config.triplets_per_request)
            requests.append(
                ask_parsed(
                    client,
                    messages,
                    parsers.parse_triplets,
                    config.workers.max_parse_retries,
                    grammars.triplets(config.triplets_per_request),
                )
            )
        answers = await asyncio.gather(*requests, return_exceptions=True)
        stats.rounds += 1
        stats.requests += len(requests)
        failures = [a for a in answers if isinstance(a, TeacherError)]
        if len(failures) == len(answers):
            raise failures[0]  # nothing gets through (a bad key, a wrong model): stop here
        for answer in answers:
            if isinstance(answer, RecordError):
                stats.unparseable += 1
                continue
            if isinstance(answer, TeacherError):
                stats.failed_requests += 1
                log.warning("self-instruct request failed: %s", answer)
                continue
            if isinstance(answer, BaseException):
                raise answer
            for triplet in answer:
                stats.triplets += 1
                if len(kept) >= config.num_instructions:
                    stats.surplus += 1
                elif index.add(triplet.question):
                    kept.append(triplet)
                else:
                    stats.near_duplicates += 1
        log.info(
            "self-instruct round %d: %d/%d instructions kept",
            stats.rounds,
            len(kept),
            config.num_instructions,
        )
    stats.kept = len(kept)
    return kept, stats


async def answer_record(row: dict[str, Any], teacher: TeacherClient, retries: int) -> Outcome:
    """A kept instruction -> a single-turn record answered with the role-enhanced prompt."""
    meta = json.loads(row["meta"])
    question = row["turns"][0]["content"]
    messages = prompts.role_answer_messages(meta["role"], question)
    answer = await ask_parsed(teacher, messages, parsers.parse_answer, retries, grammars.answer())
    record = Dialogue(
        row["id"], "self_instruct", [turn("user", question), turn("assistant", answer)], meta
    )
    return Outcome(record.validate())


def instruction_rows(config: SelfInstructConfig) -> StageInput:
    """Step 1 in the driver: generate and filter the instructions; one row per kept one."""
    from huatuo_ray.teacher.limiter import RemoteLimiter

    seeds = load_seeds(config.seeds)
    limiter_name = limiter_for_job(config.teacher)

    async def generate() -> tuple[list[Triplet], GenerationStats, TeacherClient]:
        import ray

        limiter = RemoteLimiter(ray.get_actor(limiter_name)) if limiter_name else None
        cache = ResponseCache(storage.join(config.output, CACHE_DIR))
        client = TeacherClient(config.teacher, cache, limiter, seed=config.seed)
        kept, stats = await generate_instructions(config, client, seeds)
        await client.close()
        return kept, stats, client

    kept, stats, client = asyncio.run(generate())
    rows = [
        Dialogue(
            f"self_instruct-{i:06d}",
            "self_instruct",
            [turn("user", t.question)],
            {
                "role": t.role or prompts.DEFAULT_ROLE,
                "instruction": t.instruction,
                "input": t.input,
            },
        ).to_row()
        for i, t in enumerate(kept)
    ]
    return StageInput(
        rows[: config.limit],
        [{"uri": config.seeds, "seed_triplets": len(seeds)}],
        usage=client.usage,
        extra={"generation": vars(stats)},
    )


def main(config: SelfInstructConfig) -> dict:
    return run_teacher_stage(
        config, "self-instruct", lambda: instruction_rows(config), answer_record
    )
