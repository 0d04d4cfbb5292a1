"""Rewards that are not (only) the reward model, and the weighted sum of several.

A reward source is one actor group of the ``ppo`` stage; ``reward`` is the first source and
``extra_rewards`` the others. The score of a sample is sum_k weight_k x score_k. Kinds:

* ``model``: the reward model (:class:`~huatuo_ray.rlmf.actors.frozen.RewardWorker`), its
  score normalised with the reward-model stage's statistics;
* ``teacher``: the teacher's rating against the real doctor's reply
  (:mod:`~huatuo_ray.rlmf.teacher_reward`), with budgets that stop the run cleanly;
* ``function``: a Python callable named ``module:function`` taking ``(prompt, response,
  reference, meta)`` and returning a number (a rule, or a verifier such as an exam answer checked
  against its key), run in :class:`FunctionRewardWorker` actors. For a consultation the
  response is the doctor's turns, one per line, and ``meta["turns"]`` the whole consultation
  (:mod:`~huatuo_ray.rlmf.consultation_rewards` has rules on it). An exception or a value that
  is not a finite number becomes the configured ``fallback`` and is counted
  (``reward_errors`` in the metrics), never a crash of the run.

Every source answers ``scores(exp, infos)`` with ``(scores, raw scores[, errors[, budget
spent]])`` over its share of rows; ``infos`` holds each row's prompt text, reference answer and prompt meta.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

from huatuo_ray.rlmf.actors.base import ModelWorker, timed

log = logging.getLogger(__name__)


def load_function(spec: str) -> Callable[..., float]:
    """``package.module:function`` -> the function (a clear error when it is not there)."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"reward.function {spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.function {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward.function {spec!r} is not callable")
    return fn


def call_safely(fn: Callable[..., Any], fallback: float, *args: Any) -> tuple[float, bool]:
    """(fn(*args) as a float, True) or (fallback, False) when it raised or gave no finite number."""
    try:
        value = float(fn(*args))
    except Exception as e:  # noqa: BLE001 - a user's function: any failure is counted, not fatal
        log.warning("reward function failed (%s: %s): fallback %s", type(e).__name__, e, fallback)
        return fallback, False
    if not math.isfinite(value):
        return fallback, False
    return value, True


def turn_ends(action_mask: Any) -> list[int]:
    """The last token of each run of actions in one row (a consultation's doctor turns)."""
    flags = action_mask.tolist()
    return [t for t, a in enumerate(flags) if a and (t + 1 == len(flags) or not flags[t + 1])]


class FunctionRewardWorker(ModelWorker):
    """A ``function`` reward source: decodes each response and calls the function on it; with
    ``granularity: turn`` (consultations) calls it on each doctor turn instead."""

    def __init__(
        self, spec: str, fallback: float, tokenizer_path: str, granularity: str = "conversation"
    ):
        from transformers import AutoTokenizer

        self.fn = load_function(spec)
        self.fallback = fallback
        self.granularity = granularity
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def normalisation(self) -> dict[str, float]:
        return {"mean": 0.0, "std": 1.0}

    @timed
    def scores(self, exp: Any, infos: list[dict[str, Any]]) -> tuple[Any, ...]:
        import torch

        if self.granularity == "turn":
            return self._turn_scores(exp, infos)
        values, errors = [], 0
        for row, info in enumerate(infos):
            if info["meta"].get("consultation"):  # the doctor's turns, one per line
                turns = info["meta"]["turns"]
                response = "\n".join(t["content"] for t in turns if t["role"] == "assistant")
            else:
                tokens = exp.responses[row][exp.action_mask[row].bool()].tolist()
                response = self.tokenizer.decode(tokens, skip_special_tokens=True)
            value, ok = call_safely(
                self.fn, self.fallback, info["prompt"], response, info["reference"], info["meta"]
            )
            values.append(value)
            errors += not ok
        scores = torch.tensor(values, dtype=torch.float32)
        return scores, scores.clone(), errors

    def _turn_scores(self, exp: Any, infos: list[dict[str, Any]]) -> tuple[Any, ...]:
        """Each doctor turn of each consultation scored on its own: the function gets that
        turn as the response and the consultation up to it as ``meta["turns"]`` (with
        ``meta["turn"]``, counting from 0); (sums per row, sums, errors, False, each score on
        its turn's last token)."""
        import torch

        placed = torch.zeros(exp.action_mask.shape, dtype=torch.float32)
        errors = 0
        for row, info in enumerate(infos):
            turns = info["meta"]["turns"]
            doctor = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
            ends = turn_ends(exp.action_mask[row])
            if len(ends) != len(doctor):
                raise ValueError(
                    f"row {row}: {len(ends)} doctor turns in the tokens, {len(doctor)} in the turns"
                )
            for j, (at, end) in enumerate(zip(doctor, ends)):
                meta = {**info["meta"], "turns": turns[: at + 1], "turn": j}
                value, ok = call_safely(
                    self.fn,
                    self.fallback,
                    info["prompt"],
                    turns[at]["content"],
                    info["reference"],
                    meta,
                )
                placed[row, end] = value
                errors += not ok
        scores = placed.sum(-1)
        return scores, scores.clone(), errors, False, placed


def shard_bounds(rows: int, n: int) -> list[tuple[int, int]]:
    """The row ranges of :meth:`Experience.shards` (the same split, for side lists)."""
    import torch

    bounds = torch.linspace(0, rows, n + 1).round().long().tolist()
    return list(zip(bounds, bounds[1:]))


def reward_calls(groups: dict[str, Any], names: list[str], exp: Any, infos: list[dict]) -> dict:
    """Start every reward source's scoring of one chunk, each over its workers' shares."""
    calls = {}
    for name in names:
        group = groups[name]
        shards = exp.shards(len(group))
        parts = [infos[a:b] for a, b in shard_bounds(len(exp), len(group))]
        calls[name] = [w.scores.remote(s, part) for w, s, part in zip(group.workers, shards, parts)]
    return calls


def combine(results: dict[str, list], weights: dict[str, float]) -> tuple[Any, Any, int, bool, Any]:
    """(weighted sum of the sources' scores, the first source's raw scores, errors, budget
    spent, the weighted sum's part placed on turns or None), from each source's list of
    per-shard ``(scores, raw[, errors[, spent[, placed]]])``; ``placed`` (rows, response
    width): a turn-level source's scores on the tokens they reward (its ``scores`` are their
    row sums)."""
    import torch

    total, raw, errors, spent, turns = None, None, 0, False, None
    for name, weight in weights.items():
        parts = results[name]
        scores = torch.cat([p[0] for p in parts])
        total = weight * scores if total is None else total + weight * scores
        if raw is None:
            raw = torch.cat([p[1] for p in parts])
        errors += sum(int(p[2]) for p in parts if len(p) > 2)
        spent = spent or any(bool(p[3]) for p in parts if len(p) > 3)
        if any(len(p) > 4 for p in parts):
            placed = weight * torch.cat([p[4] for p in parts])
            turns = placed if turns is None else turns + placed
    return total, raw, errors, spent, turns
