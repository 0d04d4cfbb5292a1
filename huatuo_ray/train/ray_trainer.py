"""What the training recipes share around Ray Train, on the driver: starting a stage (connect,
already complete, absolute paths), building the trainer from a stage config, and turning the
best weights a run saved into the model artifact."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

from huatuo_ray import artifacts, storage


def begin(config: Any, stage: str) -> dict[str, Any] | None:
    """The finished manifest when ``config.output`` is complete (no Ray started for it), else
    None after connecting to Ray for ``stage`` and making every path the workers use absolute
    (they may run on other nodes and in other folders). A model URI stays a URI: every node
    fetches it once (train/core.py)."""
    from huatuo_ray.runtime import connect

    if storage.exists(storage.join(config.output, artifacts.MANIFEST)):
        return artifacts.read_manifest(config.output)
    connect(config.cluster, stage)
    config.output, config.storage_path = _absolute(config.output), _absolute(config.storage_path)
    if os.path.exists(config.model.path):
        config.model.path = _absolute(config.model.path)
    return None


def tensorboard_dir(config: Any) -> str | None:
    """``config.tensorboard_dir``, or ``OUTPUT/tensorboard`` when the output is a local folder."""
    if config.tensorboard_dir:
        return config.tensorboard_dir
    return None if "://" in config.output else os.path.join(config.output, "tensorboard")


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def fit(train_loop: Callable, config: Any, datasets: dict[str, Any], train_rows: int) -> Any:
    """Run ``train_loop`` on ``config.scaling`` workers, with its checkpoint and storage settings;
    the loop gets the config, the train split's row count, whether there is a ``validation``
    dataset, and where TensorBoard goes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    scaling = config.scaling
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config,
            "train_rows": train_rows,
            "has_validation": "validation" in datasets,
            "tensorboard_dir": tensorboard_dir(config),
        },
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
