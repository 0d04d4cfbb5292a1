"""Policy worker: the model being trained, a DeepSpeed engine; it also serves the reference
log-probs through its frozen trunk when only the top layers train, and sends new weights to the
rollout engines."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from huatuo_ray.rlmf import weight_sync
from huatuo_ray.rlmf.actors.base import timed
from huatuo_ray.rlmf.actors.trainable import TrainableWorker
from huatuo_ray.rlmf.experience import Experience, per_length_group
from huatuo_ray.rlmf.model_ops import (
    FrozenTrunkReference,
    forward_logits,
    pack_rows,
    token_logprobs,
    unpack_responses,
)
from huatuo_ray.rlmf.ppo_math import (
    entropy_from_logits,
    kl_estimate,
    masked_mean,
    policy_token_losses,
    truncated_is_weights,
)
from huatuo_ray.train.core import freeze_bottom, load_model, load_tokenizer


class PolicyWorker(TrainableWorker):
    def build(self) -> torch.nn.Module:
        model_config = self.config.model
        self.tokenizer, _ = load_tokenizer(model_config)
        model = load_model(
            model_config,
            "causal",
            self.dtype(model_config),
            gradient_checkpointing=self.role.gradient_checkpointing,
        )
        self.trainable = freeze_bottom(
            model, self.role.trainable_layers, self.role.trainable_modules
        )
        return model

    def engine_ready(self) -> None:
        # Taken now, from the SFT weights in the engine's dtype and device: the reference is
        # pi_0 even after a resume (checkpoints are loaded after this).
        self.reference = None
        if self.config.reference.frozen_trunk:
            module = self.engine.module
            dtype = next(module.parameters()).dtype
            self.reference = FrozenTrunkReference(module, self.role.trainable_layers)
            self.reference.to(self.device, dtype)

    @timed
    def log_probs(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Policy log-probs of the sampled tokens, and the reference's from the frozen trunk;
        ``micro_batch_size`` rows of similar lengths at a time."""
        self.engine.eval()
        with torch.no_grad():
            return per_length_group(exp, self.config.micro_batch_size, self._log_probs)

    def _log_probs(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor | None]:
        exp = exp.to(self.device)
        temperature = self.config.sampling.temperature
        pack = self.config.pack
        if self.reference is None:
            logits = forward_logits(self.engine, exp, pack)
            return token_logprobs(logits, exp.responses, temperature).cpu(), None
        with self.reference.capture():
            logits = forward_logits(self.engine, exp, pack)
        if pack:
            packed = pack_rows(exp)
            valid = exp.action_mask.bool()
            ref = self.reference.logits(positions=packed.response_index[valid])
            ref_logits = unpack_responses(ref, packed, exp)
        else:
            width = exp.action_mask.shape[1]
            ref_logits = self.reference.logits(keep=width + 1)[:, :-1]
        return (
            token_logprobs(logits, exp.responses, temperature).cpu(),
            token_logprobs(ref_logits, exp.responses, temperature).cpu(),
        )

    def micro_loss(self, micro: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        logits = forward_logits(self.engine, micro, c.pack)
        logprobs = token_logprobs(logits, micro.responses, c.sampling.temperature)
        # No old-log-prob pass (one optimizer step per rollout: ppo_config.old_logprobs_pass):
        # the old log-probs are this forward's own, detached (ratio 1, the same gradient); what
        # the driver measures from them comes from here.
        old = micro.logprobs if micro.logprobs is not None else logprobs.detach()
        is_weights = None
        if c.tis_cap is not None and micro.rollout_logprobs is not None:
            is_weights = truncated_is_weights(
                old, micro.rollout_logprobs, micro.action_mask, c.tis_cap
            )
        losses, stats = policy_token_losses(
            logprobs, old, micro.advantages, micro.action_mask, c.clip_ratio,
            c.dual_clip, c.log_ratio_clamp, is_weights,
        )  # fmt: skip
        stats = {k: float(v.detach()) for k, v in stats.items()}
        kl = c.kl
        if micro.logprobs is None:
            stats.update(self.measured_for_the_driver(old, micro))
        if kl.placement == "loss":  # GRPO's KL term: beta x KL(pi || pi_ref), per token
            token_kl = kl_estimate(
                logprobs, micro.ref_logprobs, kl.estimator, kl.log_ratio_clamp, kl.clamp,
                micro.action_mask,
            )  # fmt: skip
            # The driver's controller's beta of this iteration (fixed unless kl.target is set).
            losses = losses + self.kl_beta * token_kl
            stats["kl_loss"] = float(masked_mean(token_kl.detach(), micro.action_mask))
            stats["kl_beta"] = self.kl_beta
        loss, logged = self.aggregate(losses, micro.action_mask)
        entropy = masked_mean(
            entropy_from_logits(logits.detach() / max(c.sampling.temperature, 1e-6)),
            micro.action_mask,
        )
        return loss, {"policy_loss": logged, "entropy": float(entropy), **stats}

    def measured_for_the_driver(self, old: torch.Tensor, micro: Experience) -> dict[str, float]:
        """Without the old-log-prob pass: the mean per-sequence KL to the reference (what the
        driver's controller and logs read) and the rollout engine's log-prob gap, from this
        forward's log-probs (equal-sized micro-batches: their means average to the rollout's)."""
        kl, mask = self.config.kl, micro.action_mask
        token_kl = kl_estimate(
            old, micro.ref_logprobs, kl.estimator, kl.log_ratio_clamp, kl.clamp, mask
        )
        stats = {"sequence_kl": float((token_kl * mask).sum(-1).mean())}
        if micro.rollout_logprobs is not None:
            gap = masked_mean((micro.rollout_logprobs - old).abs(), mask.float())
            stats["rollout_logprob_gap"] = float(gap)
        return stats

    # ---------------------------------------------------------------- weight sync

    def _trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        keep = set(self.trainable)
        return [(n, p) for n, p in self.engine.module.named_parameters() if n in keep]

    def weight_specs(self) -> list[weight_sync.ParamSpec]:
        return [
            weight_sync.ParamSpec(
                n,
                str(p.dtype).removeprefix("torch."),
                tuple(getattr(p, "ds_shape", p.shape)),  # ZeRO-3 keeps the full shape here
            )
            for n, p in self._trainable_named()
        ]

    def join_sync_group(self, addr: str, port: int, world: int, backend: str) -> None:
        if self.rank == 0:
            self.sync_group = weight_sync.join_group(addr, port, 0, world, backend)

    def _gathered(self, param: torch.nn.Parameter) -> Any:
        import contextlib

        import deepspeed

        if self.role.deepspeed.zero_stage == 3:
            return deepspeed.zero.GatheredParameters([param])
        return contextlib.nullcontext()

    def broadcast_weights(self, bucket_bytes: int) -> float:
        """Rank 0 broadcasts the trainable tensors in buckets of ``bucket_bytes`` (all ranks
        gather each parameter under ZeRO-3); seconds."""
        started = time.perf_counter()
        specs = self.weight_specs()

        def tensors() -> Any:
            for _, param in self._trainable_named():
                with self._gathered(param):
                    yield param.data

        root = self.rank == 0
        group = self.sync_group if root else None
        weight_sync.send_buckets(group, tensors(), specs, bucket_bytes, self.device, root)
        return time.perf_counter() - started

    def share_bucket(self, bucket: list[int], bucket_bytes: int) -> tuple[str, Any]:
        """The ``ipc`` path: pack the trainable tensors of ``bucket`` (indices into
        :meth:`weight_specs`) into one flat tensor on this rank's device, kept until
        :meth:`release_bucket`, and return a handle to it for the engine on this GPU (every rank
        calls it: under ZeRO-3 the gather is collective)."""
        specs = self.weight_specs()
        named = self._trainable_named()
        flat = torch.empty(
            sum(specs[i].numel for i in bucket),
            dtype=getattr(torch, specs[bucket[0]].dtype),
            device=self.device,
        )
        offset = 0
        for i in bucket:
            with self._gathered(named[i][1]):
                flat[offset : offset + specs[i].numel].copy_(named[i][1].data.reshape(-1))
            offset += specs[i].numel
        self._shared_bucket = flat
        return weight_sync.share(flat)

    def trainable_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The ``in_process`` path: (name, tensor) of each trainable parameter, gathered while
        it is handed out under ZeRO-3 (every rank iterates at once: the gather is collective)."""
        for name, param in self._trainable_named():
            with self._gathered(param):
                yield name, param.data

    def release_bucket(self) -> None:
        self._shared_bucket = None

    def weights_to_object_store(self) -> list[Any]:
        """The object-store path: [ObjectRef of [(name, tensor)]] from rank 0, [] elsewhere."""
        import ray

        named = []
        for name, param in self._trainable_named():
            with self._gathered(param):
                if self.rank == 0:
                    named.append((name, param.data.detach().cpu().clone()))
        return [ray.put(named)] if self.rank == 0 else []

    def save_model(self, uri: str) -> None:
        """The policy as a Hugging Face folder that transformers and vLLM load."""
        self.core.save_hf_model(self.tokenizer, uri)
