"""What each Ray Train worker of the ``reward-model`` stage runs: a DeepSpeed engine over a
sequence-scoring model, the pairwise loss, validation accuracy, best-on-validation weights.

Checkpointing and resume work as in SFT (:mod:`~huatuo_ray.train.sft_loop`). When validation
accuracy improves (ties broken by lower loss), the weights are saved to ``OUTPUT/best`` and the
reward statistics of that model over the training pairs (mean and std of the scores of chosen and
rejected responses) are recorded: PPO normalises rewards with them.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

from huatuo_ray import storage
from huatuo_ray.train.losses import pairwise_accuracy, pairwise_reward_loss
from huatuo_ray.train.sft_loop import _all_reduce_sum, _device_and_backend


def _scores(engine: Any, batch: dict[str, Any], device: Any) -> tuple[Any, Any]:
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    scores = engine(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
    half = ids.shape[0] // 2
    return scores[:half], scores[half:]


def _batches(shard: Any, micro_batch: int, pad_id: int) -> Any:
    from huatuo_ray.train.preference_data import collate_pairs

    return shard.iter_torch_batches(
        batch_size=micro_batch, collate_fn=lambda b: collate_pairs(b, pad_id)
    )


def evaluate(
    engine: Any,
    shard: Any,
    micro_batch: int,
    pad_id: int,
    device: Any,
    max_batches: int | None = None,
):
    """(mean loss, accuracy, reward mean, reward std, pairs) over a split, summed over workers."""
    import torch

    engine.eval()
    loss_sum = correct = pairs = total = total_sq = 0.0
    with torch.no_grad():
        for i, batch in enumerate(_batches(shard, micro_batch, pad_id)):
            if max_batches is not None and i >= max_batches:
                break
            chosen, rejected = _scores(engine, batch, device)
            n = chosen.shape[0]
            loss_sum += float(pairwise_reward_loss(chosen, rejected)) * n
            correct += float(pairwise_accuracy(chosen, rejected)) * n
            pairs += n
            both = torch.cat([chosen, rejected])
            total += float(both.sum())
            total_sq += float((both**2).sum())
    engine.train()
    loss_sum, correct, pairs, total, total_sq = _all_reduce_sum(
        [loss_sum, correct, pairs, total, total_sq], device
    )
    count = max(2 * pairs, 1.0)
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean**2, 0.0))
    return loss_sum / max(pairs, 1.0), correct / max(pairs, 1.0), mean, std, int(pairs)


def train_loop(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from huatuo_ray.train import deepspeed_setup as ds_setup
    from huatuo_ray.train.checkpointing import load_state, save_hf_model, save_state
    from huatuo_ray.train.metrics import TrainMetrics

    config = loop_config["config"]
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device, on_gpu = _device_and_backend()
    torch.manual_seed(config.seed)
    bf16 = ds_setup.use_bf16(config.deepspeed, on_gpu)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")

    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        config.model.path,
        num_labels=1,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        trust_remote_code=config.model.trust_remote_code,
    )
    model.config.pad_token_id = pad_id
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    accumulation = ds_setup.gradient_accumulation(
        config.global_batch_size, config.micro_batch_size, world
    )
    total_steps = max(1, loop_config["train_pairs"] * config.epochs // config.global_batch_size)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=ds_setup.make_optimizer(model, config.deepspeed, config.optim, on_gpu),
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_setup.engine_config(
            config.deepspeed, config.optim, config.micro_batch_size, accumulation, bf16
        ),
    )
    base_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        base_optimizer,
        lambda s: ds_setup.warmup_cosine(
            s, total_steps, config.optim.warmup_ratio, config.optim.min_lr_ratio
        ),
    )
    state: dict[str, Any] = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "best": None, "history": [],
                             "train_loss": [], "restarts": [], "reward_stats": None}  # fmt: skip
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(engine, schedule, folder)
        state["restarts"].append(state["step"])
    metrics = TrainMetrics("reward-model", rank == 0, loop_config["tensorboard_dir"], total_steps)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")

    def validate_and_maybe_save() -> dict[str, Any]:
        loss, acc, _, _, _ = evaluate(engine, val_shard, config.micro_batch_size, pad_id, device)
        best = state["best"]
        improved = (
            best is None
            or acc > best["accuracy"]
            or (acc == best["accuracy"] and loss < best["loss"])
        )
        state["history"].append({"step": state["step"], "val_loss": loss, "val_accuracy": acc})
        if improved:
            _, _, mean, std, n = evaluate(
                engine,
                train_shard,
                config.micro_batch_size,
                pad_id,
                device,
                config.norm_max_batches,
            )
            state["best"] = {"step": state["step"], "accuracy": acc, "loss": loss}
            state["reward_stats"] = {"mean": mean, "std": std, "scores": 2 * n}
            save_hf_model(
                engine,
                tokenizer,
                storage.join(config.output, "best"),
                rank,
                config.deepspeed.zero_stage,
            )
        metrics.log_validation(state["step"], loss, improved)
        return {"val_loss": loss, "val_accuracy": acc}

    def report(values: dict[str, Any], with_checkpoint: bool) -> None:
        values = {"step": state["step"], **values}
        if not with_checkpoint:
            ray.train.report(values)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_state(engine, schedule, folder, state)
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(folder))

    engine.train()
    while state["epoch"] < config.epochs:
        skip = state["micro_in_epoch"]
        for micro, batch in enumerate(_batches(train_shard, config.micro_batch_size, pad_id)):
            if micro < skip:
                continue
            chosen, rejected = _scores(engine, batch, device)
            margin = (
                batch["margin"].to(device) * config.margin_scale if config.margin_scale else None
            )
            loss = pairwise_reward_loss(chosen, rejected, margin)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            state["micro_in_epoch"] = micro + 1
            metrics.add_micro({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                              float(loss), 0.0)  # fmt: skip
            if not boundary:
                continue
            schedule.step()
            state["step"] += 1
            logged = metrics.log_step(
                state["step"], schedule.get_last_lr()[0], engine.get_global_grad_norm()
            )
            state["train_loss"].append([state["step"], logged["loss"]])
            report(logged, with_checkpoint=state["step"] % config.checkpoint.every_steps == 0)
        state["epoch"] += 1
        state["micro_in_epoch"] = 0
        report(validate_and_maybe_save(), with_checkpoint=True)
    metrics.close()
    if rank == 0:
        storage.write_json(storage.join(config.output, "_train_state.json"), state)
