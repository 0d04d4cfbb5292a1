"""Critic worker: per-token values from a sequence-scoring model (by default the reward model,
as trlx and InstructGPT did), trained with the clipped value loss."""

from __future__ import annotations

import torch

from huatuo_ray.rlmf.actors.base import timed
from huatuo_ray.rlmf.actors.trainable import TrainableWorker
from huatuo_ray.rlmf.experience import Experience, per_length_group
from huatuo_ray.rlmf.model_ops import ValueModel, forward_values
from huatuo_ray.rlmf.ppo_math import masked_mean, value_token_losses
from huatuo_ray.train.core import freeze_bottom, load_model


class CriticWorker(TrainableWorker):
    def build(self) -> torch.nn.Module:
        model_config = self.role.model
        model = load_model(
            model_config,
            "score",
            self.dtype(model_config),
            gradient_checkpointing=self.role.gradient_checkpointing,
        )
        freeze_bottom(model, self.role.trainable_layers, self.role.trainable_modules)
        return ValueModel(model)

    @timed
    def values(self, exp: Experience) -> torch.Tensor:
        """Values at sampling time, ``micro_batch_size`` rows of similar lengths at a time."""
        self.engine.eval()

        def forward(part: Experience) -> torch.Tensor:
            return forward_values(self.engine, part.to(self.device), self.config.pack).cpu()

        with torch.no_grad():
            return per_length_group(exp, self.config.micro_batch_size, forward)

    def micro_loss(self, micro: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        values = forward_values(self.engine, micro, self.config.pack)
        losses, clipped = value_token_losses(
            values, micro.values, micro.returns, self.config.value_clip
        )
        loss, logged = self.aggregate(losses, micro.action_mask)
        return loss, {
            "value_loss": logged,
            "value_clip_fraction": float(masked_mean(clipped.float(), micro.action_mask.float())),
        }
