"""What the training recipes share around Ray Train: building the trainer from a stage config,
and turning the best weights a run saved into the model artifact."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

from huatuo_ray import artifacts, storage


def fit(
    train_loop: Callable, loop_config: dict[str, Any], config: Any, datasets: dict[str, Any]
) -> Any:
    """Run ``train_loop`` on ``config.scaling`` workers, with its checkpoint and storage settings."""
    import ray.train
    from ray.train.torch import TorchTrainer

    scaling = config.scaling
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker}
            | ({"GPU": 1} if scaling.use_gpu else {}),
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=config.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def promote_best(output: str, rejects: list[dict[str, str]]) -> dict[str, Any]:
    """Move ``OUTPUT/best`` (written by rank 0) up into ``OUTPUT``, write the rejects, and return
    the loop's final state (``OUTPUT/_train_state.json``)."""
    best = storage.join(output, "best")
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(best, tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(storage.join(output, name), f.read())
    storage.delete(best)
    storage.write_bytes(
        storage.join(output, artifacts.REJECTS),
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode(),
    )
    return storage.read_json(storage.join(output, "_train_state.json"))
