"""The ``sft`` stage's part of the training loop: packed (or padded) rows of dialogues, the
next-token loss on the assistant's tokens, token-weighted validation loss. Everything else (the
engine, checkpoints, resume, the best weights) is :func:`~huatuo_ray.train.loop.run_training`'s.
"""

from __future__ import annotations

from typing import Any

from huatuo_ray.train.core import all_reduce_sum
from huatuo_ray.train.loop import TrainRun, run_training


def _model_inputs(batch: dict[str, Any], packing: bool, dtype: Any, device: Any) -> dict[str, Any]:
    from huatuo_ray.train.packing import block_causal_mask

    batch = {k: v.to(device) for k, v in batch.items()}
    if packing:
        return {
            "input_ids": batch["input_ids"],
            "labels": batch["labels"],
            "position_ids": batch["position_ids"],
            "attention_mask": block_causal_mask(batch["segment_ids"], dtype),
        }
    return {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}


class SFTSpec:
    name = "sft"
    head = "causal"

    def batches(self, run: TrainRun, shard: Any, epoch: int) -> Any:
        from huatuo_ray.train.data import collate

        c = run.config
        return shard.iter_torch_batches(
            batch_size=c.micro_batch_size,
            collate_fn=lambda b: collate(b, c.packing, run.pad_id),
            local_shuffle_buffer_size=c.shuffle_buffer if c.shuffle_buffer else None,
            local_shuffle_seed=c.seed + epoch if c.shuffle_buffer else None,
            drop_last=False,
            **run.feed,
        )

    def loss(self, run: TrainRun, batch: dict[str, Any]) -> Any:
        return run.model(**_model_inputs(batch, run.config.packing, run.dtype, run.device)).loss

    def validate(self, run: TrainRun, shard: Any) -> dict[str, float]:
        """Token-weighted mean loss over the validation split, summed over all workers."""
        import torch

        run.model.eval()
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for batch in self.batches(run, shard, epoch=0):
                n = int((batch["labels"][:, 1:] != -100).sum())
                loss_sum += float(self.loss(run, batch)) * n
                tokens += n
        run.model.train()
        loss_sum, tokens = all_reduce_sum([loss_sum, tokens], run.device)
        return {"val_loss": loss_sum / max(tokens, 1.0)}

    def better(self, new: dict[str, float], best: dict[str, Any] | None) -> bool:
        return best is None or new["val_loss"] < best["val_loss"]

    def on_best(self, run: TrainRun, train_shard: Any) -> dict[str, Any]:
        return {}


def train_loop(loop_config: dict[str, Any]) -> None:
    run_training(loop_config, SFTSpec())
