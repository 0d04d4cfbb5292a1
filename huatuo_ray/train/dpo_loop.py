"""The ``dpo`` stage's part of the training loop: preference pairs scored by the causal LM itself,
the DPO (or IPO) loss against reference log-probs computed once before training, validation
preference accuracy (the share of pairs whose implicit reward ranks the chosen answer higher).
Everything else is :func:`~huatuo_ray.train.loop.run_training`'s.

The reference log-probs come from :class:`ReferenceLogProbs`, a Ray Data pass of the frozen
initial model over the pairs, before the trainers start: the workers then hold one model each,
not two, and every epoch reuses the same numbers.
"""

from __future__ import annotations

from typing import Any

from huatuo_ray.train.core import all_reduce_sum
from huatuo_ray.train.loop import TrainRun, run_training
from huatuo_ray.train.losses import dpo_loss, response_logprobs
from huatuo_ray.train.preference_data import pair_accuracy_improved


def response_mask(attention_mask: Any, prompt_len: Any) -> Any:
    """(2B, L) 1 on response tokens: real tokens at or after each pair's prompt length."""
    import torch

    lengths = torch.cat([prompt_len, prompt_len]).to(attention_mask.device)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return attention_mask * (columns[None, :] >= lengths[:, None])


def pair_logprobs(model: Any, batch: dict[str, Any], device: Any) -> tuple[Any, Any]:
    """(chosen, rejected) sequence log-probs of the response tokens, each (B,)."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logps = response_logprobs(logits, ids, response_mask(mask, batch["prompt_len"]))
    half = ids.shape[0] // 2
    return logps[:half], logps[half:]


class ReferenceLogProbs:
    """Ray Data callable: pair rows + ``ref_chosen``/``ref_rejected`` from the frozen model."""

    def __init__(self, model_path: str, pad_id: int, micro_batch: int):
        import torch
        from transformers import AutoModelForCausalLM

        from huatuo_ray.models.kernels import shape_stable_attention

        shape_stable_attention()  # pairs pad to a new width in every batch
        on_gpu = torch.cuda.is_available()
        self.device = "cuda" if on_gpu else "cpu"
        dtype = torch.bfloat16 if on_gpu else torch.float32  # what the trainers compute in
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.model.to(self.device).eval()
        self.pad_id, self.micro_batch = pad_id, micro_batch

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa
        import torch

        from huatuo_ray.train.preference_data import collate_pairs

        columns = table.to_pydict()
        chosen: list[float] = []
        rejected: list[float] = []
        with torch.no_grad():
            for a in range(0, table.num_rows, self.micro_batch):
                part = {k: v[a : a + self.micro_batch] for k, v in columns.items()}
                batch = collate_pairs(part, self.pad_id)
                c, r = pair_logprobs(self.model, batch, self.device)
                chosen += c.cpu().tolist()
                rejected += r.cpu().tolist()
        table = table.append_column("ref_chosen", pa.array(chosen, pa.float32()))
        return table.append_column("ref_rejected", pa.array(rejected, pa.float32()))


class DPOSpec:
    name = "dpo"
    head = "causal"

    def batches(self, run: TrainRun, shard: Any, epoch: int) -> Any:
        from huatuo_ray.train.preference_data import pair_batches

        return pair_batches(shard, run.config.micro_batch_size, run.pad_id, **run.feed)

    def _loss(self, run: TrainRun, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        chosen, rejected = pair_logprobs(run.model, batch, run.device)
        c = run.config
        return dpo_loss(
            chosen,
            rejected,
            batch["ref_chosen"].to(run.device),
            batch["ref_rejected"].to(run.device),
            c.beta,
            c.label_smoothing,
            c.loss,
        )

    def loss(self, run: TrainRun, batch: dict[str, Any]) -> Any:
        return self._loss(run, batch)[0]

    def validate(self, run: TrainRun, shard: Any) -> dict[str, float]:
        """Mean loss, preference accuracy and implicit-reward margin, over all workers."""
        import torch

        run.model.eval()
        loss_sum = correct = margin = pairs = 0.0
        with torch.no_grad():
            for batch in self.batches(run, shard, 0):
                loss, chosen, rejected = self._loss(run, batch)
                n = chosen.shape[0]
                loss_sum += float(loss) * n
                correct += float((chosen > rejected).float().sum())
                margin += float((chosen - rejected).sum())
                pairs += n
        run.model.train()
        loss_sum, correct, margin, pairs = all_reduce_sum(
            [loss_sum, correct, margin, pairs], run.device
        )
        pairs = max(pairs, 1.0)
        return {
            "val_loss": loss_sum / pairs,
            "val_accuracy": correct / pairs,
            "val_reward_margin": margin / pairs,
        }

    def better(self, new: dict[str, float], best: dict[str, Any] | None) -> bool:
        return pair_accuracy_improved(new, best)

    def on_best(self, run: TrainRun, train_shard: Any) -> dict[str, Any]:
        return {}


def train_loop(loop_config: dict[str, Any]) -> None:
    run_training(loop_config, DPOSpec())
