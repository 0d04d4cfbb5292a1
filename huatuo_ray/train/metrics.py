"""Training metrics of a worker: loss, lr, grad norm, tokens/s, packing efficiency, and where each
optimizer step's time went.

Counted per micro-batch *on the device* (no host sync: a ``float(loss)`` per micro-batch would
stall the GPU's queue each time), summed over all workers once per optimizer step (one small
all-reduce, the step's only sync), then written by rank 0 to TensorBoard, the terminal and the
Ray dashboard. Ray Train's ``report`` is not the channel for them: it blocks until its
controller's next poll (2 s in Ray 2.60), so the loop reports only with a checkpoint.

Step time (:class:`StepClock`) is split three ways, summed over the step's micro-batches:
``data_wait_s`` (blocked waiting for the next micro-batch), ``compute_s`` (forward, backward,
optimizer, up to the device finishing the step) and ``other_s`` (everything else: the loop's own
bookkeeping, logging, validation and checkpoints between steps).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from huatuo_ray import telemetry

log = logging.getLogger("huatuo_ray.train")

TIMING = ("data_wait_s", "compute_s", "other_s")


class StepClock:
    """Where one optimizer step's wall time went: waiting for data, computing, the rest.

    The window runs from the end of the previous step's compute to the end of this one's, so the
    three parts add up to the step's wall time (the previous step's logging and checkpoints are
    this step's ``other_s``). ``sync`` waits for the device before a step's compute is counted
    done (CUDA runs asynchronously: without it compute would be the time to *launch* kernels).
    """

    def __init__(self, sync: Any = None):
        self.sync = sync
        self.window_start = time.perf_counter()
        self.data_wait = self.compute = 0.0
        self._mark = self.window_start

    def waiting(self) -> None:
        """About to ask for the next micro-batch."""
        self._mark = time.perf_counter()

    def got_batch(self) -> None:
        now = time.perf_counter()
        self.data_wait += now - self._mark
        self._mark = now

    def computed(self, step_end: bool) -> dict[str, float] | None:
        """A micro-batch's forward/backward (and optimizer step) was issued; at a step's end,
        the step's split (and a new window)."""
        if step_end and self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.compute += now - self._mark
        self._mark = now
        if not step_end:
            return None
        wall = now - self.window_start
        split = {
            "step_s": wall,
            "data_wait_s": self.data_wait,
            "compute_s": self.compute,
            "other_s": max(wall - self.data_wait - self.compute, 0.0),
        }
        self.window_start, self.data_wait, self.compute = now, 0.0, 0.0
        return split


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
        self.micro = self.tokens = self.rows = 0  # host counts: known from shapes alone
        self.sums: Any = None  # device tensor [loss, real tokens, packed samples]

    def add_micro(self, batch: dict[str, Any], loss: Any) -> None:
        """Count a micro-batch; ``loss`` stays a device tensor (summed there, read at the step)."""
        import torch

        ids = batch["input_ids"]
        self.micro += 1
        self.tokens += ids.numel()
        if "segment_ids" in batch:  # packed: segments 1..k per row, 0 is padding
            seg = batch["segment_ids"]
            real, samples = (seg > 0).sum(), seg.amax(dim=1).sum()
        else:  # a row is a sample: counted on the host (no copy to the device)
            real, samples = batch["attention_mask"].sum(), None
            self.rows += ids.shape[0]
        packed = samples.float() if samples is not None else real.new_zeros((), dtype=torch.float)
        row = torch.stack([loss.detach().float().reshape(()), real.float(), packed])
        self.sums = row if self.sums is None else self.sums + row

    def log_step(
        self, step: int, lr: float, grad_norm: Any, timing: dict[str, float]
    ) -> dict[str, float]:
        """Reduce the step's counts over all workers (one all-reduce) and log them; ``timing``:
        this worker's :meth:`StepClock.computed` split (the slowest worker's is the step's)."""
        import torch
        import torch.distributed as dist

        local = self.sums if self.sums is not None else torch.zeros(3)
        sums = torch.cat(
            [
                local.double(),
                torch.tensor([float(self.micro), float(self.tokens), float(self.rows)]).to(
                    local.device
                ),
            ]
        )
        wall = torch.tensor([timing[k] for k in ("step_s", *TIMING)], dtype=torch.float64)
        if dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            sums, wall = sums.to(device), wall.to(device)
            dist.all_reduce(sums)
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        loss_sum, real, packed_samples, micro, tokens, rows = sums.tolist()
        samples = packed_samples + rows
        step_s, *split = wall.tolist()
        elapsed = max(step_s, 1e-9)
        values = {
            "loss": loss_sum / max(micro, 1),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": real / elapsed,
            "samples_per_s": samples / elapsed,
            "packing_efficiency": real / max(tokens, 1),
            "step_s": step_s,
            **dict(zip(TIMING, split)),
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
                "%s step %d/%d loss %.4f lr %.2e grad %.3f %.0f tok/s %.1f samples/s eff %.2f"
                " | step %.3fs data %.3fs compute %.3fs other %.3fs | ETA %.0fs",
                self.stage, step, self.total_steps, values["loss"], lr, values["grad_norm"],
                values["tokens_per_s"], values["samples_per_s"], values["packing_efficiency"],
                step_s, *split, eta,
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


def timing_summary(state: dict[str, Any]) -> dict[str, Any]:
    """The run's step timing for the manifest: totals over the steps after the first (it holds
    start-up: compilation, the first batch), and the share of step time spent waiting for data."""
    rows = state.get("step_timing", [])[1:] or state.get("step_timing", [])
    totals = {k: sum(r[i + 2] for r in rows) for i, k in enumerate(TIMING)}
    wall = sum(r[1] for r in rows)
    return {
        **{k: round(v, 4) for k, v in totals.items()},
        "step_s": round(wall, 4),
        "steps_timed": len(rows),
        "data_wait_fraction": round(totals["data_wait_s"] / wall, 4) if wall else None,
    }
