"""Stage ``sft``: hybrid SFT, a Ray Train ``TorchTrainer`` whose workers run DeepSpeed engines.

    python -m huatuo_ray sft --config jobs/tiny/sft.yaml

1. Tokenise the mixture's train and validation splits on Ray Data with the chat template and the
   assistant-only loss mask, packing samples into ``max_length`` rows (or length-grouping them);
   samples left with no supervised token are rejected and counted.
2. Train on ``scaling.num_workers`` workers (:mod:`~huatuo_ray.train.sft_loop`), streaming each
   worker its shard; checkpoints go to ``storage_path/run_name`` through ``ray.train.report``, and
   a failed worker (``checkpoint.max_failures``) or a resubmitted job resumes from the latest.
3. The weights with the lowest validation loss become the model artifact in ``output``: a
   Hugging Face folder with the chat template and a manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from huatuo_ray import artifacts
from huatuo_ray.config import input_artifact, option, to_dict
from huatuo_ray.models.fetch import local_model_path
from huatuo_ray.models.preflight import check_base_model
from huatuo_ray.train.loop import TrainStageConfig
from huatuo_ray.train.metrics import timing_summary
from huatuo_ray.train.ray_trainer import begin, fit, promote_best

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SFTConfig(TrainStageConfig):
    """Supervised fine-tuning on the hybrid data."""

    train: str = input_artifact(
        "dataset artifact of training dialogues (e.g. MIXTURE/train)", made_by="mixture"
    )
    validation: str | None = input_artifact(
        "dataset artifact for validation (e.g. MIXTURE/validation)", made_by="mixture", default=None
    )
    max_length: int = option(2048, help="tokens per sample (and per packed row); paper: 2048")
    packing: bool = option(True, help="pack several samples per row, kept apart by the mask")
    global_batch_size: int = option(
        128, help="rows per optimizer step over all workers; paper: 128"
    )
    epochs: int = option(3, help="passes over the training set; paper: 3")
    shuffle_buffer: int = option(256, help="rows in each worker's local shuffle buffer (0: off)")
    run_name: str = option("sft", help="run name under storage_path: the same name resumes")
    tokenize_workers: int = option(2, help="Ray Data actors tokenising and packing")
    allow_untrained: bool = option(
        False, help="skip the preflight (base model's loss on real text)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 16:
            raise ValueError("max_length must be at least 16")


def main(config: SFTConfig) -> dict[str, Any]:
    from huatuo_ray.train.data import prepare_split
    from huatuo_ray.train.sft_loop import train_loop

    if (done := begin(config, "sft")) is not None:
        return done
    base = local_model_path(config.model.path)
    check_base_model(base, config.allow_untrained, config.model.trust_remote_code)

    small = config.tokenize_in_driver_below
    train = prepare_split(
        config.train, config.model.path, config.max_length, config.packing,
        config.tokenize_workers, in_driver_below=small,
    )  # fmt: skip
    datasets = {"train": train.dataset}
    validation = None
    if config.validation:
        validation = prepare_split(
            config.validation, config.model.path, config.max_length, config.packing,
            in_driver_below=small,
        )  # fmt: skip
        datasets["validation"] = validation.dataset
    log.info(
        "sft: %d training rows from %d samples (%d rejected)",
        train.rows,
        train.samples,
        len(train.rejects),
    )

    result = fit(train_loop, config, datasets, train.rows)
    return finish(config, train, validation, result)


def finish(config: SFTConfig, train: Any, validation: Any, result: Any) -> dict[str, Any]:
    """Move the best weights into place as the model artifact and write its manifest."""
    rejects = train.rejects + (validation.rejects if validation else [])
    state = promote_best(config.output, rejects)
    artifacts.write_model_manifest(
        config.output,
        "sft",
        to_dict(config),
        inputs=[artifacts.input_summary(config.train)]
        + ([artifacts.input_summary(config.validation)] if config.validation else []),
        training={
            "steps": state["step"],
            "epochs": state["epoch"],
            "best_val_loss": state["best"]["val_loss"] if state["best"] else None,
            "validation_history": state["history"],
            "train_loss": state["train_loss"],
            "restarts": state["restarts"],
            "tokens_per_s": state.get("tokens_per_s", []),
            "step_timing": timing_summary(state),
            "train_rows": train.rows,
            "train_samples": train.samples,
            "rejected_samples": len(rejects),
            "final_metrics": {
                k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))
            },
            "checkpoints": str(result.path) if getattr(result, "path", None) else None,
        },
    )
    return artifacts.read_manifest(config.output)
