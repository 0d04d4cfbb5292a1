"""Checkpoints of a ``ppo`` run (:mod:`~huatuo_ray.rlmf.ppo`), in ``OUTPUT/checkpoints``.

``iter_N`` holds the policy's and the critic's DeepSpeed states (weights, optimizer, LR schedule)
and the driver's ``state.json`` (iteration, beta, prompt position, metrics history, restarts,
and the teacher's usage so far, which a resumed run's raters and patients take up so that their
budgets span restarts; requests paid after the checkpoint are replayed from the cache for free
and not counted again); ``latest`` names the newest complete one and is written last;
``checkpoint.keep`` are kept.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from huatuo_ray import storage
from huatuo_ray.rlmf.ppo_config import teacher_groups

if TYPE_CHECKING:
    from huatuo_ray.rlmf.ppo_config import PPOConfig
    from huatuo_ray.rlmf.rl_prompts import PromptStream

log = logging.getLogger(__name__)


def _checkpoints(config: PPOConfig) -> str:
    return os.path.join(config.output, "checkpoints")


def save_checkpoint(config: PPOConfig, groups: dict[str, Any], state: dict[str, Any]) -> None:
    """Policy and critic shards, then the driver's state, then ``latest``: a crash at any point
    leaves the previous checkpoint as the newest complete one."""
    import ray

    root = _checkpoints(config)
    folder = os.path.join(root, f"iter_{state['iteration']:06d}")
    ray.get(
        [
            ref
            for name in ("policy", "critic")
            if name in groups
            for ref in groups[name].call("save_checkpoint", os.path.join(folder, name))
        ]
    )
    # What the teacher was paid so far (raters, patients): a resumed run's budgets count it.
    state["teacher_usage"] = {
        n: ray.get(groups[n].workers[0].usage.remote()) for n in teacher_groups(config)
    }
    storage.write_json(os.path.join(folder, "state.json"), state)
    tmp = os.path.join(root, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(os.path.basename(folder))
    os.replace(tmp, os.path.join(root, "latest"))
    kept = sorted(d for d in os.listdir(root) if d.startswith("iter_"))
    for old in kept[: -config.checkpoint.keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    log.warning("ppo: checkpoint %s", folder)


def load_latest_checkpoint(
    config: PPOConfig, groups: dict[str, Any], prompts: PromptStream
) -> dict[str, Any]:
    import ray

    latest = os.path.join(_checkpoints(config), "latest")
    if not os.path.exists(latest):
        return {"iteration": 0, "beta": config.kl.init_beta, "position": [0, 0], "history": [],
                "restarts": []}  # fmt: skip
    with open(latest) as f:
        folder = os.path.join(_checkpoints(config), f.read().strip())
    ray.get(
        [
            ref
            for name in ("policy", "critic")
            if name in groups
            for ref in groups[name].call("load_checkpoint", os.path.join(folder, name))
        ]
    )
    state = storage.read_json(os.path.join(folder, "state.json"))
    ray.get(
        [
            groups[n].workers[0].restore_usage.remote(used)
            for n, used in state.get("teacher_usage", {}).items()
            if n in groups
        ]
    )
    state["restarts"].append(state["iteration"])
    prompts.position = list(state["position"])
    log.warning("ppo: resumed from %s (iteration %d)", folder, state["iteration"])
    return state
