"""Training metrics of a worker: loss, lr, grad norm, tokens/s, samples/s, packing efficiency.

Counted per micro-batch, summed over all workers at each optimizer step (one small all-reduce),
then written by rank 0 to TensorBoard, the terminal and the Ray dashboard, and returned for
``ray.train.report``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from huatuo_ray import telemetry

log = logging.getLogger("huatuo_ray.train")


class TrainMetrics:
    def __init__(self, stage: str, is_rank0: bool, tensorboard_dir: str | None, total_steps: int):
        self.stage, self.is_rank0, self.total_steps = stage, is_rank0, total_steps
        self.writer = None
        if is_rank0 and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        self._reset()
        self.started = time.time()

    def _reset(self) -> None:
        self.loss_sum = self.micro = self.tokens = self.real_tokens = self.samples = 0.0
        self.window_start = time.perf_counter()

    def add_micro(self, batch: dict[str, Any], loss: float, seconds: float) -> None:
        ids = batch["input_ids"]
        self.micro += 1
        self.loss_sum += loss
        self.tokens += ids.numel()
        if "segment_ids" in batch:
            seg = batch["segment_ids"]
            self.real_tokens += int((seg > 0).sum())
            self.samples += int(sum(len(set(row.tolist()) - {0}) for row in seg))
        else:
            self.real_tokens += int(batch["attention_mask"].sum())
            self.samples += ids.shape[0]

    def log_step(self, step: int, lr: float, grad_norm: Any) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        elapsed = time.perf_counter() - self.window_start
        t = torch.tensor(
            [self.loss_sum, self.micro, self.tokens, self.real_tokens, self.samples],
            dtype=torch.float64,
        )
        if dist.is_initialized():
            t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t)
        loss_sum, micro, tokens, real, samples = t.tolist()
        values = {
            "loss": loss_sum / max(micro, 1),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": real / max(elapsed, 1e-9),
            "samples_per_s": samples / max(elapsed, 1e-9),
            "packing_efficiency": real / max(tokens, 1),
        }
        if self.is_rank0:
            for name, value in values.items():
                if self.writer is not None:
                    self.writer.add_scalar(f"train/{name}", value, step)
            for name in ("loss", "tokens_per_s", "lr", "grad_norm"):
                telemetry.gauge(f"train_{name}", values[name], self.stage)
            telemetry.gauge("progress_fraction", step / max(self.total_steps, 1), self.stage)
            eta = (time.time() - self.started) / step * (self.total_steps - step) if step else 0
            log.warning(
                "%s step %d/%d loss %.4f lr %.2e grad %.3f %.0f tok/s %.1f samples/s eff %.2f ETA %.0fs",
                self.stage, step, self.total_steps, values["loss"], lr, values["grad_norm"],
                values["tokens_per_s"], values["samples_per_s"], values["packing_efficiency"], eta,
            )  # fmt: skip
        self._reset()
        return values

    def log_validation(self, step: int, val_loss: float, best: bool) -> None:
        if self.is_rank0:
            if self.writer is not None:
                self.writer.add_scalar("validation/loss", val_loss, step)
            telemetry.gauge("validation_loss", val_loss, self.stage)
            log.warning(
                "%s step %d validation loss %.4f%s",
                self.stage,
                step,
                val_loss,
                " (best)" if best else "",
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
