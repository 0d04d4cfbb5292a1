"""The part policy and critic share: a DeepSpeed engine trained for PPO epochs over minibatches of
one rollout, checkpointed and restored with the run.

Batch terms: ``minibatch_size`` rows make one optimizer step over the whole group;
each worker holds ``minibatch_size / workers`` of them and runs them ``micro_batch_size`` at a
time, so gradient accumulation = minibatch / (micro x workers).
"""

from __future__ import annotations

from typing import Any

import torch

from huatuo_ray.rlmf.actors.base import ModelWorker
from huatuo_ray.rlmf.experience import Experience
from huatuo_ray.rlmf.model_ops import disable_dropout
from huatuo_ray.train.core import TrainingCore, all_reduce_mean, all_reduce_sum


class TrainableWorker(ModelWorker):
    """Subclasses build ``self.module`` in ``build`` and define ``micro_loss``."""

    def __init__(self, config: Any, role: Any):
        self.config, self.role = config, role  # the PPO config and this group's part of it

    @property
    def role_name(self) -> str:
        return type(self).__name__.removesuffix("Worker").lower()

    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def micro_loss(self, micro: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def setup(self, addr: str, port: int, rank: int, world: int, total_steps: int) -> int:
        """Join the group, build the model and its engine; returns the trainable parameter count."""
        self.init_distributed(addr, port, rank, world)
        torch.manual_seed(self.config.seed)
        module = self.build()
        disable_dropout(module)
        c = self.config
        self.core = TrainingCore(
            module,
            self.role.deepspeed,
            self.role.optim,
            c.micro_batch_size,
            c.minibatch_size // (c.micro_batch_size * world),
            total_steps,
            self.device.type == "cuda",
        )
        self.engine = self.core.engine
        self.engine_ready()
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def engine_ready(self) -> None:
        """Called once the engine holds the initial weights, before any step or restore."""

    def train(self, exp: Experience, iteration: int, kl_beta: float) -> dict[str, float]:
        """``ppo_epochs`` passes over this worker's share of the rollout; mean stats.
        ``kl_beta``: the KL coefficient of this iteration, from the driver's controller (the
        policy's loss applies it with ``kl.placement: loss``)."""
        import time

        started = time.perf_counter()
        c = self.config
        self.kl_beta = kl_beta
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + iteration)
        per_worker = c.minibatch_size // self.world_size
        self.engine.train()
        sums: dict[str, float] = {}
        count = 0
        for _ in range(c.ppo_epochs):
            for minibatch in exp.minibatches(per_worker, generator):
                self.step_totals(minibatch)
                # Rows of similar lengths together, padding trimmed: the step's gradient is
                # the same (each micro-batch's loss is its share of the step's; step_totals).
                for _, micro in minibatch.length_groups(c.micro_batch_size):
                    loss, stats = self.micro_loss(micro.to(self.device))
                    self.core.backward_step(loss)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
        means = {k: v / max(count, 1) for k, v in sums.items()}
        means["lr"] = self.core.lr
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        # The worker's own time, against the driver's train_s: the rest is Ray's (transfer, queue).
        means[f"{self.role_name}_train_s"] = time.perf_counter() - started
        return all_reduce_mean(means, self.device)

    def step_totals(self, minibatch: Experience) -> None:
        """Response tokens and rows of this optimizer step over every rank (one all-reduce), so
        that each micro-batch's loss is its exact share of the step's loss
        (:func:`~huatuo_ray.rlmf.ppo_math.aggregate_loss`)."""
        local = [float(minibatch.action_mask.sum()), float(len(minibatch))]
        self.total_tokens, self.total_rows = all_reduce_sum(local, self.device)

    def aggregate(self, losses: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(what to hand DeepSpeed, the micro-batch's own mean for logs). DeepSpeed divides by
        the accumulation steps and averages gradients over ranks; the share is scaled back so
        the step's gradient is that of its loss over all its tokens."""
        from huatuo_ray.rlmf.ppo_math import aggregate_loss

        mode = self.config.loss_agg
        share = aggregate_loss(losses, mask, mode, self.total_tokens, self.total_rows)
        scale = self.core.engine.gradient_accumulation_steps() * self.world_size
        return share * scale, float(aggregate_loss(losses.detach(), mask, mode))

    def save_checkpoint(self, folder: str) -> None:
        """Every rank writes its shards (collective); frozen weights are left out."""
        self.core.save_checkpoint(folder)

    def load_checkpoint(self, folder: str) -> None:
        self.core.load_checkpoint(folder)
