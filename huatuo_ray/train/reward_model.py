"""Stage ``reward-model``: a sequence-scoring model trained on the mixed-feedback preferences.

    python -m huatuo_ray reward-model --config jobs/tiny/reward-model.yaml

Initialised from the SFT model (or any Hugging Face model) with a one-output head, trained on
Ray Train + DeepSpeed with the Bradley-Terry pairwise loss (optionally with a margin from the
teacher's rating gap, ``margin_scale``). Prompts are split into train and validation by hash;
validation accuracy is measured each epoch and the most accurate weights are kept. The output is a
Hugging Face folder loadable with ``AutoModelForSequenceClassification``, with the reward mean and
std over the training pairs in its manifest (``reward_normalisation``), which PPO uses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import artifacts, storage
from huatuo_ray.config import input_artifact, option, to_dict
from huatuo_ray.train.deepspeed_setup import OptimConfig
from huatuo_ray.train.loop import TrainStageConfig
from huatuo_ray.train.ray_trainer import fit, promote_best

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RewardModelConfig(TrainStageConfig):
    """Train the reward model on preference pairs."""

    preferences: str = input_artifact(
        "preference artifact (the score stage's output)", made_by="score"
    )
    validation_fraction: float = option(0.1, help="share of prompts held out for validation")
    max_length: int = option(1024, help="longest prompt + response; longer pairs are rejected")
    margin_scale: float = option(0.0, help="loss margin = this x the teacher's rating gap (0: off)")
    micro_batch_size: int = option(4, help="pairs per worker per forward/backward")
    global_batch_size: int = option(32, help="pairs per optimizer step over all workers")
    epochs: int = option(2, help="passes over the training pairs")
    norm_max_batches: int | None = option(None, help="micro-batches used for the reward statistics")
    seed: int = option(0, help="seed of initialisation and the split")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    run_name: str = option(
        "reward-model", help="run name under storage_path: the same name resumes"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in (0, 1)")
        if self.margin_scale < 0:
            raise ValueError("margin_scale must be >= 0")


def main(config: RewardModelConfig) -> dict[str, Any]:
    from huatuo_ray.runtime import connect
    from huatuo_ray.train.preference_data import prepare_pairs, split_preferences
    from huatuo_ray.train.reward_loop import train_loop

    connect(config.cluster, "reward-model")
    if storage.exists(storage.join(config.output, artifacts.MANIFEST)):
        return artifacts.read_manifest(config.output)
    config.output, config.storage_path = (
        p if "://" in p else os.path.abspath(p) for p in (config.output, config.storage_path)
    )
    # A URI stays a URI: every node fetches it once into its own cache (train/core.py).
    if os.path.exists(config.model.path):
        config.model.path = os.path.abspath(config.model.path)
    rows = list(artifacts.iter_rows(config.preferences))
    split = split_preferences(rows, config.validation_fraction, config.seed, config.preferences)
    prepared = {k: prepare_pairs(v, config.model.path, config.max_length) for k, v in split.items()}
    train_pairs = prepared["train"][0].count()
    tensorboard_dir = config.tensorboard_dir or (
        os.path.join(config.output, "tensorboard") if "://" not in config.output else None
    )
    fit(
        train_loop,
        {
            "config": config,
            "train_rows": train_pairs,
            "has_validation": True,
            "tensorboard_dir": tensorboard_dir,
        },
        config,
        {k: v[0] for k, v in prepared.items()},
    )
    return finish(config, prepared, train_pairs)


def finish(config: RewardModelConfig, prepared: dict, train_pairs: int) -> dict[str, Any]:
    """Move the best weights into place as the model artifact and write its manifest."""
    rejects = prepared["train"][1] + prepared["validation"][1]
    state = promote_best(config.output, rejects)
    artifacts.write_model_manifest(
        config.output,
        "reward-model",
        to_dict(config),
        inputs=[artifacts.input_summary(config.preferences)],
        head="AutoModelForSequenceClassification, num_labels=1",
        reward_normalisation=state["reward_stats"],
        training={
            "steps": state["step"],
            "best": {
                "step": state["best"]["step"],
                "accuracy": state["best"]["val_accuracy"],
                "loss": state["best"]["val_loss"],
            },
            "validation_history": state["history"],
            "train_loss": state["train_loss"],
            "restarts": state["restarts"],
            "train_pairs": train_pairs,
            "validation_pairs": prepared["validation"][0].count(),
            "rejected_pairs": len(rejects),
        },
    )
    return artifacts.read_manifest(config.output)
