"""Dynamic filtering of groups (DAPO's dynamic sampling): a group whose answers all got the same
reward has zero advantage under every group estimator, so it only dilutes the update. With
``algorithm.dynamic_filtering`` such groups are dropped and more prompts sampled until the
rollout has ``rollout_size`` informative groups, or ``algorithm.max_filter_rounds`` rollouts were
made (then the rollout is topped up with the dropped groups, so the batch keeps its size)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def informative_rollout(
    config: Any, sample: Callable[[], Any], counts: dict[str, float], pad_id: int
) -> Any:
    """``sample()`` once, or until enough informative groups; ``counts["filtered_groups"]``
    gets the number of groups dropped."""
    import torch

    from huatuo_ray.rlmf.advantages import informative_groups
    from huatuo_ray.rlmf.experience import concat

    exp = sample()
    algorithm, n = config.algorithm, config.sampling.n
    if not algorithm.dynamic_filtering or algorithm.uses_critic:
        return exp
    kept, dropped, filtered = [], [], 0
    for round_ in range(algorithm.max_filter_rounds):
        if round_:
            exp = sample()
        good = informative_groups(exp.scores, n)
        filtered += int((~good).sum())
        rows = good.repeat_interleave(n)
        kept.append(exp.select(rows.nonzero().squeeze(-1)))
        dropped.append(exp.select((~rows).nonzero().squeeze(-1)))
        if sum(len(k) for k in kept) >= config.rows:
            break
    counts["filtered_groups"] = counts.get("filtered_groups", 0) + filtered
    pool = [p for p in kept + dropped if len(p)]
    merged = concat(pool, pad_id) if len(pool) > 1 else pool[0]
    return merged.select(torch.arange(config.rows))
