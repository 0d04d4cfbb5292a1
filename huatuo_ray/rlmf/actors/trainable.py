"""The part policy and critic share: a DeepSpeed engine trained for PPO epochs over minibatches of
one rollout, checkpointed and restored with the run.

Batch terms: ``minibatch_size`` rows make one optimizer step over the whole group;
each worker holds ``minibatch_size / workers`` of them and runs them ``micro_batch_size`` at a
time, so gradient accumulation = minibatch / (micro x workers).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from huatuo_ray.rlmf.actors.base import ModelWorker, all_reduce_mean, deepspeed_engine
from huatuo_ray.rlmf.experience import Experience
from huatuo_ray.rlmf.model_ops import disable_dropout

TAG = "deepspeed"


class TrainableWorker(ModelWorker):
    """Subclasses build ``self.module`` in ``build`` and define ``micro_loss``."""

    def __init__(self, config: Any, role: Any):
        self.config, self.role = config, role  # the PPO config and this group's part of it

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
        self.accumulation = c.minibatch_size // (c.micro_batch_size * world)
        self.engine, self.schedule = deepspeed_engine(
            module,
            self.role.deepspeed,
            self.role.optim,
            c.micro_batch_size,
            self.accumulation,
            total_steps,
            self.device.type == "cuda",
        )
        self.engine_ready()
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def engine_ready(self) -> None:
        """Called once the engine holds the initial weights, before any step or restore."""

    def train(self, exp: Experience, iteration: int) -> dict[str, float]:
        """``ppo_epochs`` passes over this worker's share of the rollout; mean stats."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + iteration)
        per_worker = c.minibatch_size // self.world_size
        self.engine.train()
        sums: dict[str, float] = {}
        count = 0
        for _ in range(c.ppo_epochs):
            for minibatch in exp.minibatches(per_worker, generator):
                for start in range(0, len(minibatch), c.micro_batch_size):
                    micro = minibatch.select(slice(start, start + c.micro_batch_size))
                    loss, stats = self.micro_loss(micro.to(self.device))
                    self.engine.backward(loss)
                    boundary = self.engine.is_gradient_accumulation_boundary()
                    self.engine.step()
                    if boundary:
                        self.schedule.step()
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
        means = {k: v / max(count, 1) for k, v in sums.items()}
        means["lr"] = self.schedule.get_last_lr()[0]
        return all_reduce_mean(means, self.device)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, folder: str) -> None:
        """Every rank writes its shards (collective); rank 0 adds the LR schedule. Frozen
        weights are left out: they come back from the model the run started from."""
        self.engine.save_checkpoint(folder, tag=TAG, exclude_frozen_parameters=True)
        if self.rank == 0:
            torch.save(self.schedule.state_dict(), os.path.join(folder, "schedule.pt"))
            with open(os.path.join(folder, "worker.json"), "w") as f:
                json.dump({"world_size": self.world_size}, f)

    def load_checkpoint(self, folder: str) -> None:
        with open(os.path.join(folder, "worker.json")) as f:
            saved = json.load(f)["world_size"]
        if saved != self.world_size:
            raise ValueError(
                f"{folder} was written by {saved} workers, this group has {self.world_size}:"
                " resume with the same resources.workers"
            )
        path, _ = self.engine.load_checkpoint(folder, tag=TAG, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {folder}")
        self.schedule.load_state_dict(
            torch.load(os.path.join(folder, "schedule.pt"), weights_only=False)
        )
