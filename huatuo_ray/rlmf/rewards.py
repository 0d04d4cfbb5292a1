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


class FunctionRewardWorker(ModelWorker):
    """A ``function`` reward source: decodes each response and calls the function on it."""

    def __init__(self, spec: str, fallback: float, tokenizer_path: str):
        from transformers import AutoTokenizer

        self.fn = load_function(spec)
        self.fallback = fallback
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def normalisation(self) -> dict[str, float]:
        return {"mean": 0.0, "std": 1.0}

    @timed
    def scores(self, exp: Any, infos: list[dict[str, Any]]) -> tuple[Any, Any, int]:
        import torch

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


def combine(results: dict[str, list], weights: dict[str, float]) -> tuple[Any, Any, int, bool]:
    """(weighted sum of the sources' scores, the first source's raw scores, errors, budget
    spent), from each source's list of per-shard ``(scores, raw[, errors[, spent]])``."""
    import torch

    total, raw, errors, spent = None, None, 0, False
    for name, weight in weights.items():
        parts = results[name]
        scores = torch.cat([p[0] for p in parts])
        total = weight * scores if total is None else total + weight * scores
        if raw is None:
            raw = torch.cat([p[1] for p in parts])
        errors += sum(int(p[2]) for p in parts if len(p) > 2)
        spent = spent or any(bool(p[3]) for p in parts if len(p) > 3)
    return total, raw, errors, spent
