"""What a ``ppo`` run (:mod:`~huatuo_ray.rlmf.ppo`) reports each iteration: one record to
TensorBoard, the Ray dashboard's gauges, the terminal and ``OUTPUT/metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from huatuo_ray.rlmf.ppo_config import stage_name

if TYPE_CHECKING:
    from huatuo_ray.rlmf.ppo_config import PPOConfig

log = logging.getLogger(__name__)


class PPOMetrics:
    """Per-iteration figures to TensorBoard, the Ray dashboard, the terminal and metrics.jsonl."""

    def __init__(self, config: PPOConfig, started: float | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        self.writer = SummaryWriter(config.tensorboard_dir)
        self.started = started or time.time()  # each record's elapsed_s counts from here
        self.first: int | None = None
        self._usage: dict[str, dict[str, Any]] = {}  # the teacher's use at the last record

    def log(
        self,
        iteration: int,
        exp: Any,
        beta: float,
        sequence_kl: float,
        policy_stats: dict[str, float],
        critic_stats: dict[str, float],
        times: dict[str, float],
        figures: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        from huatuo_ray import telemetry
        from huatuo_ray.rlmf import ppo_math

        lengths = exp.action_mask.sum(-1).float()
        record = {
            "iteration": iteration,
            "reward_mean": float(exp.scores.mean()),
            "reward_std": float(exp.scores.std()) if len(exp) > 1 else 0.0,
            "raw_score_mean": float(exp.raw_scores.mean()),
            "kl": sequence_kl,
            "beta": beta,
            "response_length": float(lengths.mean()),
            # Rollout engine vs policy on the same tokens: near 0 when the engines hold the
            # policy's weights, at any temperature (both score logits / T); with top-k or top-p
            # the engine's are of the truncated distribution, higher by the log of its mass.
            "rollout_logprob_gap": policy_stats.pop("rollout_logprob_gap")
            if exp.logprobs is None  # no old-log-prob pass: the training forward measured it
            else float(
                ppo_math.masked_mean(
                    (exp.rollout_logprobs - exp.logprobs).abs(), exp.action_mask.float()
                )
            ),
            "finished_fraction": float(exp.finished.float().mean()),
            **policy_stats,
            **{k: v for k, v in critic_stats.items() if k != "lr"},
            **times,
            "rollout_tokens_per_s": float(lengths.sum()) / max(times["generate_s"], 1e-9),
            "samples_per_s": len(exp) / max(sum(times.values()), 1e-9),
            "elapsed_s": time.time() - self.started,  # wall clock since the stage started
            **(figures or {}),
        }
        for name, value in record.items():
            if name != "iteration" and isinstance(value, (int, float)):  # not per-round lists
                self.writer.add_scalar(f"ppo/{name}", value, iteration)
        stage = stage_name(self.config)
        for name in ("reward_mean", "kl", "entropy", "samples_per_s", "response_length",
                     "clip_fraction", "rollout_tokens_per_s", "generate_s", "experience_s",
                     "train_s", "sync_s"):  # fmt: skip
            telemetry.gauge(f"ppo_{name}", record[name], stage)
        telemetry.gauge("progress_fraction", iteration / self.config.iterations, stage)
        if self.first is None:
            self.first, self.first_done = iteration - 1, time.time()
        done = iteration - self.first
        # From this process's first iteration on (start-up and warm-up left out, after one).
        per = (time.time() - self.first_done) / (done - 1) if done > 1 else record["elapsed_s"]
        eta = per * (self.config.iterations - iteration)
        log.warning(
            "ppo %d/%d reward %.3f±%.3f kl %.3f beta %.3f entropy %.2f clip %.3f vloss %.4f len %.1f"
            " gap %.1e | gen %.1fs exp %.1fs train %.1fs sync %.2fs | ETA %.0fs",
            iteration, self.config.iterations, record["reward_mean"], record["reward_std"],
            sequence_kl, beta, record["entropy"], record["clip_fraction"], record.get("value_loss", 0.0),
            record["response_length"], record["rollout_logprob_gap"], times["generate_s"], times["experience_s"],
            times["train_s"], times["sync_s"], eta,
        )  # fmt: skip
        with open(os.path.join(self.config.output, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def teacher_usage(self, usage: dict[str, dict[str, Any]]) -> dict[str, float]:
        """The teacher's use so far (each teacher group's client usage: raters, patients) as
        the record's ``teacher_paid`` and ``teacher_cost_usd``, and the increments since the
        last call counted into the teacher series the teacher stages export (the dashboard's
        requests and cost panels), tagged by role."""
        from huatuo_ray import telemetry

        stage = stage_name(self.config)
        before = self._usage
        for role, used in usage.items():
            was = before.get(role, {})
            for kind in ("paid", "cached"):
                new = used.get(kind, 0) - was.get(kind, 0)
                telemetry.count("teacher_requests_total", new, stage, kind=kind, role=role)
            cost = used.get("cost_usd", 0.0) - was.get("cost_usd", 0.0)
            telemetry.count("teacher_cost_usd_total", cost, stage, role=role)
        self._usage = usage
        return {
            "teacher_paid": float(sum(u.get("paid", 0) for u in usage.values())),
            "teacher_cost_usd": float(sum(u.get("cost_usd", 0.0) for u in usage.values())),
        }

    def close(self) -> None:
        self.writer.close()


def gpu_memory(groups: dict[str, Any]) -> dict[str, float]:
    """GPU memory after the iteration (nothing on CPUs): the most any device had in use
    (``gpu_used_gib``: every process on it, colocated groups together) and the sum of the
    workers' own peak allocations (``gpu_peak_allocated_gib``)."""
    import ray

    from huatuo_ray.rlmf.actors.shared_process import process_of

    processes = {}  # groups in shared processes (colocate_in_process) counted once
    for group in groups.values():
        for worker in group.workers:
            processes.setdefault(process_of(worker)._actor_id, worker)
    stats = [s for s in ray.get([w.gpu_memory.remote() for w in processes.values()]) if s]
    if not stats:
        return {}
    return {
        "gpu_used_gib": max(s["device_used_gib"] for s in stats),
        "gpu_peak_allocated_gib": sum(s["peak_allocated_gib"] for s in stats),
    }
