"""Critic worker: per-token values from a sequence-scoring model (by default the reward model,
as trlx and InstructGPT did), trained with the clipped value loss."""

from __future__ import annotations

import torch

from huatuo_ray.models.fetch import fetched_model
from huatuo_ray.rlmf.actors.trainable import TrainableWorker
from huatuo_ray.rlmf.experience import Experience
from huatuo_ray.rlmf.model_ops import ValueModel, freeze_bottom, response_values
from huatuo_ray.rlmf.ppo_math import value_loss


class CriticWorker(TrainableWorker):
    def build(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        model_config = fetched_model(self.role.model)  # a URI: fetched to this node first
        model = AutoModelForSequenceClassification.from_pretrained(
            model_config.path,
            num_labels=1,
            dtype=self.dtype(model_config),
            trust_remote_code=model_config.trust_remote_code,
        )
        if self.role.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        freeze_bottom(model, self.role.trainable_layers, self.role.trainable_modules)
        return ValueModel(model)

    def values(self, exp: Experience) -> torch.Tensor:
        exp = exp.to(self.device)
        self.engine.eval()
        with torch.no_grad():
            values = self.engine(exp.sequences, exp.attention_mask, exp.position_ids)
        return response_values(values, exp).cpu()

    def micro_loss(self, micro: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        values = response_values(
            self.engine(micro.sequences, micro.attention_mask, micro.position_ids), micro
        )
        loss, stats = value_loss(
            values, micro.values, micro.returns, micro.action_mask, self.config.value_clip
        )
        return loss, {
            "value_loss": float(loss.detach()),
            "value_clip_fraction": float(stats["value_clip_fraction"]),
        }
