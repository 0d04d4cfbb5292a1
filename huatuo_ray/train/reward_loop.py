"""The ``reward-model`` stage's part of the training loop: pairs scored by a one-output head, the
Bradley-Terry loss (optionally with a margin), validation accuracy. When accuracy improves (ties
broken by lower loss) the reward statistics of that model over the training pairs (mean and std of
the scores of chosen and rejected responses) are kept with it: PPO normalises rewards with them.
Everything else is :func:`~huatuo_ray.train.loop.run_training`'s.
"""

from __future__ import annotations

import math
from typing import Any

from huatuo_ray.train.core import all_reduce_sum
from huatuo_ray.train.loop import TrainRun, run_training
from huatuo_ray.train.losses import pairwise_accuracy, pairwise_reward_loss
from huatuo_ray.train.preference_data import pair_accuracy_improved


def _scores(run: TrainRun, batch: dict[str, Any]) -> tuple[Any, Any]:
    ids, mask = batch["input_ids"].to(run.device), batch["attention_mask"].to(run.device)
    scores = run.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
    half = ids.shape[0] // 2
    return scores[:half], scores[half:]


def evaluate(run: TrainRun, shard: Any, max_batches: int | None = None):
    """(mean loss, accuracy, reward mean, reward std, pairs) over a split, summed over workers."""
    import torch

    run.model.eval()
    loss_sum = correct = pairs = total = total_sq = 0.0
    with torch.no_grad():
        for i, batch in enumerate(RewardSpec().batches(run, shard, 0)):
            if max_batches is not None and i >= max_batches:
                break
            chosen, rejected = _scores(run, batch)
            n = chosen.shape[0]
            loss_sum += float(pairwise_reward_loss(chosen, rejected)) * n
            correct += float(pairwise_accuracy(chosen, rejected)) * n
            pairs += n
            both = torch.cat([chosen, rejected])
            total += float(both.sum())
            total_sq += float((both**2).sum())
    run.model.train()
    loss_sum, correct, pairs, total, total_sq = all_reduce_sum(
        [loss_sum, correct, pairs, total, total_sq], run.device
    )
    count = max(2 * pairs, 1.0)
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean**2, 0.0))
    return loss_sum / max(pairs, 1.0), correct / max(pairs, 1.0), mean, std, int(pairs)


class RewardSpec:
    name = "reward-model"
    head = "score"

    def batches(self, run: TrainRun, shard: Any, epoch: int) -> Any:
        from huatuo_ray.train.preference_data import pair_batches

        return pair_batches(shard, run.config.micro_batch_size, run.pad_id, **run.feed)

    def loss(self, run: TrainRun, batch: dict[str, Any]) -> Any:
        chosen, rejected = _scores(run, batch)
        scale = run.config.margin_scale
        margin = batch["margin"].to(run.device) * scale if scale else None
        return pairwise_reward_loss(chosen, rejected, margin)

    def validate(self, run: TrainRun, shard: Any) -> dict[str, float]:
        loss, accuracy, _, _, _ = evaluate(run, shard)
        return {"val_loss": loss, "val_accuracy": accuracy}

    def better(self, new: dict[str, float], best: dict[str, Any] | None) -> bool:
        return pair_accuracy_improved(new, best)

    def on_best(self, run: TrainRun, train_shard: Any) -> dict[str, Any]:
        _, _, mean, std, n = evaluate(run, train_shard, run.config.norm_max_batches)
        return {"reward_stats": {"mean": mean, "std": std, "scores": 2 * n}}


def train_loop(loop_config: dict[str, Any]) -> None:
    run_training(loop_config, RewardSpec())
