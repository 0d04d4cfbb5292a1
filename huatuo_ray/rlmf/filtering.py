"""Filling a rollout with usable groups. Dynamic filtering (DAPO's dynamic sampling): a group
whose answers all got the same reward has zero advantage under every group estimator, so it only
dilutes the update. With ``algorithm.dynamic_filtering`` such groups are dropped and more prompts
sampled until the rollout has ``rollout_size`` informative groups, or
``algorithm.max_filter_rounds`` rollouts were made (then the rollout is topped up with the
dropped groups, so the batch keeps its size). A consultation rollout leaves out the groups with a
broken consultation (:func:`~huatuo_ray.rlmf.consultation.sample_consultations`), so it too may
come back short: more cases are sampled the same way, and a rollout still short after
``max_filter_rounds`` stops the run with the drops by reason rather than train on less."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def informative_rollout(
    config: Any, sample: Callable[[], Any], counts: dict[str, float], pad_id: int
) -> Any:
    """``sample()`` once, or until enough (informative) rows; ``counts["filtered_groups"]``
    gets the number of groups dropped as uninformative. ``sample()`` may give fewer rows than
    ``config.rows``, or None (nothing usable); None is returned at once when
    ``counts["budget_spent"]`` is set (the run stops)."""
    import torch

    from huatuo_ray.rlmf.advantages import informative_groups
    from huatuo_ray.rlmf.experience import concat

    algorithm, n = config.algorithm, config.sampling.n
    filtering = algorithm.dynamic_filtering and not algorithm.uses_critic
    kept, dropped, filtered = [], [], 0
    for _ in range(algorithm.max_filter_rounds):
        exp = sample()
        if counts.get("budget_spent"):
            return None
        if exp is None:
            continue
        if not filtering:
            kept.append(exp)
        else:
            good = informative_groups(exp.scores, n)
            filtered += int((~good).sum())
            rows = good.repeat_interleave(n)
            kept.append(exp.select(rows.nonzero().squeeze(-1)))
            dropped.append(exp.select((~rows).nonzero().squeeze(-1)))
        if sum(len(k) for k in kept) >= config.rows:
            break
    if filtering:
        counts["filtered_groups"] = counts.get("filtered_groups", 0) + filtered
    pool = [p for p in kept + dropped if len(p)]
    have = sum(len(p) for p in pool)
    if have < config.rows:
        drops = {k: v for k, v in counts.items() if k.startswith("consultations_")}
        raise RuntimeError(
            f"only {have} of {config.rows} rows usable after {algorithm.max_filter_rounds} "
            f"rollouts (groups with a dropped consultation left out: {drops}); raise "
            "rollout.consultation.max_tokens or fix the patient endpoint"
        )
    merged = concat(pool, pad_id) if len(pool) > 1 else pool[0]
    return merged if len(merged) == config.rows else merged.select(torch.arange(config.rows))
