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
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import artifacts
from huatuo_ray.config import option, to_dict
from huatuo_ray.train.deepspeed_setup import OptimConfig
from huatuo_ray.train.preference_data import PairStageConfig, promote_pair_model
from huatuo_ray.train.ray_trainer import begin, fit

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RewardModelConfig(PairStageConfig):
    """Train the reward model on preference pairs."""

    margin_scale: float = option(0.0, help="loss margin = this x the teacher's rating gap (0: off)")
    norm_max_batches: int | None = option(None, help="micro-batches used for the reward statistics")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    run_name: str = option(
        "reward-model", help="run name under storage_path: the same name resumes"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.margin_scale < 0:
            raise ValueError("margin_scale must be >= 0")


def main(config: RewardModelConfig) -> dict[str, Any]:
    from huatuo_ray.train.preference_data import prepare_preferences
    from huatuo_ray.train.reward_loop import train_loop

    if (done := begin(config, "reward-model")) is not None:
        return done
    prepared = prepare_preferences(config)
    train_pairs = prepared["train"][0].count()
    fit(train_loop, config, {k: v[0] for k, v in prepared.items()}, train_pairs)
    return finish(config, prepared, train_pairs)


def finish(config: RewardModelConfig, prepared: dict, train_pairs: int) -> dict[str, Any]:
    """Move the best weights into place as the model artifact and write its manifest (with the
    reward statistics PPO normalises by)."""
    state, training = promote_pair_model(config, prepared, train_pairs)
    artifacts.write_model_manifest(
        config.output,
        "reward-model",
        to_dict(config),
        inputs=[artifacts.input_summary(config.preferences)],
        head="AutoModelForSequenceClassification, num_labels=1",
        reward_normalisation=state["reward_stats"],
        training=training,
    )
    return artifacts.read_manifest(config.output)
