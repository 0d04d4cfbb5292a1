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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huatuo_ray import storage
from huatuo_ray.chat import Dialogue, RecordError, turn
from huatuo_ray.config import ClusterConfig, TeacherConfig, option, to_dict
from huatuo_ray.distill.common import WorkersConfig, already_complete, ask_parsed, limiter_for_job
from huatuo_ray.distill.pipeline import CACHE_DIR, Outcome, run_teacher_map, write_result
from huatuo_ray.distill.similarity import NearDuplicateIndex
from huatuo_ray.teacher import grammars, parsers, prompts
from huatuo_ray.teacher.cache import ResponseCache
from huatuo_ray.teacher.client import TeacherClient, TeacherError
from huatuo_ray.teacher.parsers import Triplet

log = logging.getLogger(__name__)
BUNDLED_SEEDS = str(Path(__file__).with_name("seeds.jsonl"))


@dataclass
class SelfInstructConfig:
    """Generate medical instructions with role-enhanced self-instruct and answer them."""

    output: str = option(help="artifact folder to write (its _teacher_cache makes reruns free)")
    seeds: str = option(BUNDLED_SEEDS, help="JSONL of seed triplets {role, instruction, input}")
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
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    overwrite: bool = option(False, help="redo a complete artifact (cached answers are reused)")
    shard_rows: int = option(10_000, help="records per Parquet shard")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
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


def main(config: SelfInstructConfig) -> dict:
    from huatuo_ray.runtime import connect
    from huatuo_ray.teacher.limiter import RemoteLimiter

    connect(config.cluster, "self-instruct")
    if (done := already_complete(config.output, config.overwrite)) is not None:
        return done
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
    result = run_teacher_map(
        rows,
        "huatuo_ray.distill.self_instruct.answer_record",
        config.teacher,
        config.output,
        workers=config.workers.num_workers,
        batch_size=config.workers.batch_size,
        fn_kwargs={"retries": config.workers.max_parse_retries},
        limiter_name=limiter_name,
        stage="self-instruct",
    )
    result.usage.add(client.usage)
    return write_result(
        result,
        config.output,
        "self-instruct",
        to_dict(config),
        [{"uri": config.seeds, "seed_triplets": len(seeds)}],
        config.teacher,
        config.shard_rows,
        extra={"generation": vars(stats)},
    )
