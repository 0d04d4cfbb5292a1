"""The ``teacher`` reward kind: the teacher judges each answer online against the real doctor's
reply, with the appendix-B rating prompt, through the project's cached, rate-limited
:class:`~huatuo_ray.teacher.client.TeacherClient`, from a Ray actor.

Two modes:

* ``pairwise`` (the paper's mixed feedback, online): the answers of a group are paired (0-1,
  2-3, ...; an odd last one with the first), each pair rated in both orders (position swap), and
  an answer's score is the mean of the ratings it got (1-10);
* ``versus_doctor``: each answer is rated against the doctor's own reply standing as the other
  response, in one order: a 1-10 score on the teacher's scale, independent of the group.

Budgets (``budget``): total paid requests, total cost (USD) and paid requests per iteration. The
worker never sends a request that would pass one: it answers ``spent`` instead, and the driver
stops the run cleanly before training on that rollout (the manifest says why). Cached answers
cost nothing and are not counted. An answer the teacher could not rate (unparseable after the
retries, or the request failed for good) gets the source's ``fallback`` and is counted.
"""

from __future__ import annotations

import asyncio
from typing import Any

from huatuo_ray.config import TeacherConfig
from huatuo_ray.rlmf.actors.base import ModelWorker
from huatuo_ray.rlmf.ppo_config import TeacherBudget, TeacherRewardConfig  # noqa: F401 - here too


def would_pass_budget(b: TeacherBudget, used: Any, iteration_paid: int, requests: int) -> bool:
    """Whether ``requests`` more paid requests (at the mean cost so far) pass a limit of ``b``,
    given a client's ``usage`` and the requests paid this iteration. Shared by the teacher's two
    roles in a run: the rater and the consultations' patient."""
    cost_each = used.cost_usd / used.paid if used.paid else 0.0
    return (
        (b.max_requests is not None and used.paid + requests > b.max_requests)
        or (
            b.max_requests_per_iteration is not None
            and iteration_paid + requests > b.max_requests_per_iteration
        )
        or (b.max_cost_usd is not None and used.cost_usd + requests * cost_each > b.max_cost_usd)
    )


def pairs_of_group(n: int) -> list[tuple[int, int]]:
    """Pairs (i, j) covering every answer of a group of ``n``, each to be rated in both orders."""
    pairs = [(i, i + 1) for i in range(0, n - 1, 2)]
    if n % 2 and n > 1:
        pairs.append((n - 1, 0))
    return pairs


class PaidTeacherWorker(ModelWorker):  # its timeline stays empty: it waits on the teacher
    """A worker that pays the teacher (the rater, the consultations' patients): one teacher
    client (cache under the run's output, rate limits) in an async Ray actor, its spending
    under a :class:`TeacherBudget`, its usage kept in checkpoints."""

    def open_client(self, teacher: TeacherConfig, cache_uri: str, budget: TeacherBudget) -> None:
        from huatuo_ray.teacher.cache import ResponseCache
        from huatuo_ray.teacher.client import TeacherClient
        from huatuo_ray.teacher.limiter import LocalLimiter

        limiter = LocalLimiter(teacher.requests_per_minute, teacher.tokens_per_minute)
        self.client = TeacherClient(teacher, ResponseCache(cache_uri), limiter)
        self.budget = budget
        self.iteration_paid = 0

    def usage(self) -> dict[str, Any]:
        return self.client.usage.to_dict()

    def restore_usage(self, used: dict[str, Any]) -> None:
        """Take up a checkpoint's usage (a resumed run): budgets count what was paid before."""
        self.client.usage.add(used)

    def begin_iteration(self) -> None:
        self.iteration_paid = 0

    def _would_pass_budget(self, requests: int) -> bool:
        return would_pass_budget(self.budget, self.client.usage, self.iteration_paid, requests)


class TeacherRewardWorker(PaidTeacherWorker):
    """The teacher scoring rollout chunks, its requests in flight together on the actor's
    event loop."""

    def __init__(self, spec: TeacherRewardConfig, n: int, fallback: float, tokenizer_path: str,
                 cache_uri: str):  # fmt: skip
        from transformers import AutoTokenizer

        self.spec, self.n, self.fallback = spec, n, fallback
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.open_client(spec.teacher, cache_uri, spec.budget)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def normalisation(self) -> dict[str, float]:
        return {"mean": 0.0, "std": 1.0}

    async def scores(self, exp: Any, infos: list[dict[str, Any]]) -> tuple[Any, Any, int, bool]:
        """(scores, raw ratings, answers left unrated, budget spent) for the rows of ``exp``."""
        import torch

        responses = [
            self.tokenizer.decode(
                exp.responses[row][exp.action_mask[row].bool()].tolist(), skip_special_tokens=True
            )
            for row in range(len(infos))
        ]
        jobs = self._jobs(responses, infos)
        if self._would_pass_budget(len(jobs)):  # a bound: cached answers would be free
            empty = torch.full((len(infos),), self.fallback)
            return empty, empty.clone(), 0, True
        paid_before = self.client.usage.paid
        ratings = await asyncio.gather(*(self._rate(*job) for job in jobs))
        self.iteration_paid += self.client.usage.paid - paid_before
        await self.client.flush()  # ratings in the cache before the driver goes on: a rerun
        # after a kill replays them instead of paying again
        got: list[list[float]] = [[] for _ in infos]
        for (rows, _), rated in zip(jobs, ratings):
            if rated is not None:
                for row, value in zip(rows, rated):
                    if row is not None:
                        got[row].append(value)
        values = [sum(g) / len(g) if g else self.fallback for g in got]
        scores = torch.tensor(values, dtype=torch.float32)
        return scores, scores.clone(), sum(1 for g in got if not g), False

    def _jobs(self, responses: list[str], infos: list[dict]) -> list[tuple[tuple, list]]:
        """((row of A, row of B or None), messages) per request."""
        from huatuo_ray.teacher.prompts import consultation_rating_messages, rating_messages

        def ask(a: int, b: int | None) -> list:
            info = infos[a]
            meta = info["meta"]
            if meta.get("consultation"):  # whole consultations on one case
                # Against the doctor's: the real consultation stands as B (its text as given).
                other = infos[b]["meta"]["turns"] if b is not None else info["reference"]
                return consultation_rating_messages(
                    meta["case"], info["reference"], meta["turns"], other
                )
            text_b = responses[b] if b is not None else info["reference"]
            return rating_messages(
                meta["turns"][:-1], info["prompt"], info["reference"], responses[a], text_b
            )

        jobs = []
        if self.spec.mode == "versus_doctor":
            return [((row, None), ask(row, None)) for row in range(len(responses))]
        for start in range(0, len(responses), self.n):
            for i, j in pairs_of_group(min(self.n, len(responses) - start)):
                a, b = start + i, start + j
                jobs.append(((a, b), ask(a, b)))
                jobs.append(((b, a), ask(b, a)))  # swapped
        return jobs

    async def _rate(self, rows: tuple, messages: list) -> tuple[float, float] | None:
        from huatuo_ray.dialogue import RecordError
        from huatuo_ray.teacher import grammars
        from huatuo_ray.teacher.client import TeacherError
        from huatuo_ray.teacher.parsers import parse_rating
        from huatuo_ray.teacher.stage import ask_parsed

        try:  # the rating's shape goes with the request when teacher.structured_outputs is on
            return await ask_parsed(
                self.client, messages, parse_rating, self.spec.max_parse_retries, grammars.rating()
            )
        except (TeacherError, RecordError):
            return None
