"""What each Ray Train worker of the ``sft`` stage runs: one DeepSpeed engine, streamed batches.

Checkpoints: every ``checkpoint.every_steps`` optimizer steps (and at each epoch's end) every
rank writes its DeepSpeed shards plus a small ``state.json`` (step, epoch, micro-batches done in
the epoch, best validation loss) into a fresh folder and reports it with ``ray.train.report``;
Ray Train keeps the newest ``checkpoint.keep`` and hands the latest back through
``ray.train.get_checkpoint()`` after a worker failure or when the job is submitted again with
the same ``run_name``. The run then continues from that step: batches already done in the epoch
are skipped by count, not repeated (Ray Data may hand them out in another order after a restart,
so "the same batches" holds for the count, not for each sample).

Best model: after each validation, if the loss is the lowest so far, the weights are saved as a
Hugging Face folder to ``OUTPUT/best`` (the paper kept the weights that did best on validation).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from huatuo_ray import storage


def _device_and_backend() -> tuple[Any, bool]:
    import ray.train.torch
    import torch

    device = ray.train.torch.get_device()
    return device, device.type == "cuda" and torch.cuda.is_available()


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


def _all_reduce_sum(values: list[float], device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _batches(shard: Any, config: Any, pad_id: int, epoch: int) -> Any:
    from huatuo_ray.train.data import collate

    return shard.iter_torch_batches(
        batch_size=config.micro_batch_size,
        collate_fn=lambda b: collate(b, config.packing, pad_id),
        local_shuffle_buffer_size=config.shuffle_buffer if config.shuffle_buffer else None,
        local_shuffle_seed=config.seed + epoch if config.shuffle_buffer else None,
        drop_last=False,
    )


def validate(engine: Any, shard: Any, config: Any, pad_id: int, dtype: Any, device: Any) -> float:
    """Token-weighted mean loss over the validation split, summed over all workers."""
    import torch

    engine.eval()
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for batch in _batches(shard, config, pad_id, epoch=0):
            n = int((batch["labels"][:, 1:] != -100).sum())
            out = engine(**_model_inputs(batch, config.packing, dtype, device))
            loss_sum += float(out.loss) * n
            tokens += n
    engine.train()
    loss_sum, tokens = _all_reduce_sum([loss_sum, tokens], device)
    return loss_sum / max(tokens, 1.0)


def train_loop(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from huatuo_ray.train import deepspeed_setup as ds_setup
    from huatuo_ray.train.checkpointing import load_state, save_hf_model, save_state
    from huatuo_ray.train.metrics import TrainMetrics

    config = loop_config["config"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device, on_gpu = _device_and_backend()
    torch.manual_seed(config.seed)
    bf16 = ds_setup.use_bf16(config.deepspeed, on_gpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")

    tokenizer = AutoTokenizer.from_pretrained(
        config.model.path, trust_remote_code=config.model.trust_remote_code
    )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    model = AutoModelForCausalLM.from_pretrained(
        config.model.path,
        dtype=dtype,
        trust_remote_code=config.model.trust_remote_code,
        attn_implementation=config.attn_implementation,
    )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if config.lora.enabled:
        from huatuo_ray.train.lora import apply_lora

        model = apply_lora(model, config.lora)

    accumulation = ds_setup.gradient_accumulation(
        config.global_batch_size, config.micro_batch_size, world
    )
    # Partial accumulations carry over into the next epoch, so count steps over all epochs.
    total_steps = max(1, loop_config["train_rows"] * config.epochs // config.global_batch_size)
    optimizer = ds_setup.make_optimizer(model, config.deepspeed, config.optim, on_gpu)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_setup.engine_config(
            config.deepspeed, config.optim, config.micro_batch_size, accumulation, bf16
        ),
    )
    # The LR schedule drives the optimizer DeepSpeed wraps (ZeRO keeps the torch one inside).
    base_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        base_optimizer,
        lambda step: ds_setup.warmup_cosine(
            step, total_steps, config.optim.warmup_ratio, config.optim.min_lr_ratio
        ),
    )

    state = {
        "step": 0,
        "epoch": 0,
        "micro_in_epoch": 0,
        "best_val_loss": None,
        "history": [],  # validation: [{step, val_loss}]
        "train_loss": [],  # [[step, loss]]
        "tokens_per_s": [],  # [[step, real tokens/s over all workers]]
        "restarts": [],  # steps at which a run resumed from a checkpoint
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(engine, schedule, folder)
        state["restarts"].append(state["step"])
    metrics = TrainMetrics("sft", rank == 0, loop_config["tensorboard_dir"], total_steps)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if loop_config["has_validation"] else None

    def report(extra: dict[str, Any], with_checkpoint: bool) -> None:
        values = {"step": state["step"], "epoch": state["epoch"], **extra}
        if not with_checkpoint:
            ray.train.report(values)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_state(engine, schedule, folder, state)
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def evaluate_and_maybe_save_best() -> dict[str, Any]:
        if val_shard is None:
            return {}
        val_loss = validate(engine, val_shard, config, pad_id, dtype, device)
        best = state["best_val_loss"]
        improved = best is None or val_loss < best
        state["history"].append({"step": state["step"], "val_loss": val_loss})
        if improved:
            state["best_val_loss"] = val_loss
            save_hf_model(
                engine,
                tokenizer,
                storage.join(config.output, "best"),
                rank,
                config.deepspeed.zero_stage,
            )
        metrics.log_validation(state["step"], val_loss, improved)
        return {"val_loss": val_loss, "best_val_loss": state["best_val_loss"]}

    engine.train()
    while state["epoch"] < config.epochs:
        skip = state["micro_in_epoch"]
        for micro, batch in enumerate(_batches(train_shard, config, pad_id, state["epoch"])):
            if micro < skip:
                continue  # done before the restart
            started = time.perf_counter()
            out = engine(**_model_inputs(batch, config.packing, dtype, device))
            engine.backward(out.loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            state["micro_in_epoch"] = micro + 1
            metrics.add_micro(batch, float(out.loss), time.perf_counter() - started)
            if not boundary:
                continue
            schedule.step()
            state["step"] += 1
            logged = metrics.log_step(
                state["step"], schedule.get_last_lr()[0], engine.get_global_grad_norm()
            )
            state["train_loss"].append([state["step"], logged["loss"]])
            state["tokens_per_s"].append([state["step"], logged["tokens_per_s"]])
            evaluate_now = config.eval_every_steps and state["step"] % config.eval_every_steps == 0
            extra = evaluate_and_maybe_save_best() if evaluate_now else {}
            save_now = state["step"] % config.checkpoint.every_steps == 0
            report({**logged, **extra}, with_checkpoint=save_now)
        state["epoch"] += 1
        state["micro_in_epoch"] = 0
        extra = evaluate_and_maybe_save_best()
        report(extra, with_checkpoint=True)
    metrics.close()
    if rank == 0:
        storage.write_json(
            storage.join(config.output, "_train_state.json"),
            {
                k: state[k]
                for k in (
                    "step",
                    "epoch",
                    "best_val_loss",
                    "history",
                    "train_loss",
                    "restarts",
                    "tokens_per_s",
                )
            },
        )
    if val_shard is None:
        save_hf_model(
            engine,
            tokenizer,
            storage.join(config.output, "best"),
            rank,
            config.deepspeed.zero_stage,
        )
