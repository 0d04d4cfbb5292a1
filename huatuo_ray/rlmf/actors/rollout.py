"""Rollout worker: one generation engine (vLLM, tensor-parallel over its GPUs, or HF generate)
that samples responses and takes new policy weights after each update.

Two ways in (:mod:`~huatuo_ray.rlmf.rollout_schedule` picks one): ``generate`` answers one chunk
of prompts in one call; ``generate_stream`` takes the engine's whole share of the rollout and
yields pieces as they finish (a Ray streaming generator), so the driver scores the first pieces
while the engine still decodes the rest. Each piece carries the wall-clock times of its
generation, and ``engine_stats`` the engine's mean batch, for the schedule's figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from huatuo_ray.inference.generation import (
    EngineConfig,
    HFGenerator,
    Sample,
    SamplingConfig,
    StreamStats,
    VLLMGenerator,
    make_generator,
)
from huatuo_ray.rlmf import weight_sync
from huatuo_ray.rlmf.actors.base import ModelWorker


class RolloutWorker(ModelWorker):
    def __init__(self, model_path: str, engine: EngineConfig, sampling: SamplingConfig):
        self.generator = make_generator(model_path, engine)
        self.tensor_parallel_size = engine.tensor_parallel_size
        self.sampling = sampling
        self.sync_group: Any = None
        self.calls: list[int] = []  # prompts per generate call since the last engine_stats
        self.warm_up()

    def warm_up(self) -> None:
        """A few tokens for two prompts, while the other groups still load, so that the first
        iteration does not pay HF ``generate``'s first-call costs. vLLM's engine warms itself
        up when it starts."""
        if isinstance(self.generator, HFGenerator):
            one = SamplingConfig(**{**self.sampling.__dict__, "n": 1, "max_new_tokens": 4})
            bos = self.generator.tokenizer.bos_token_id or 0
            self.generator.generate([[bos, 5, 6], [bos, 7]], one, [0, 1], logprobs=True)
            self.generator.stats = StreamStats()

    @property
    def backend(self) -> str:
        return "vllm" if isinstance(self.generator, VLLMGenerator) else "hf"

    def generate(self, prompts: list[list[int]], seeds: list[int]) -> list[Sample]:
        """One response per prompt, with the engine's log-prob of each sampled token (the driver
        compares them with the policy's: a check that weight sync worked). Seeded."""
        self.calls.append(len(prompts))
        pieces = list(self.generate_stream(prompts, seeds, len(prompts)))
        samples: list[Any] = [None] * len(prompts)
        for piece in pieces:
            for i, sample in zip(piece["indices"], piece["samples"]):
                samples[i] = sample
        return samples

    def generate_stream(
        self, prompts: list[list[int]], seeds: list[int], piece_size: int
    ) -> Iterator[dict[str, Any]]:
        """All ``prompts`` at once; yields ``{"indices", "samples", "started", "finished"}`` per
        piece of ``piece_size`` finished prompts (indices into ``prompts``; wall-clock times of
        the call's start and of the piece's end)."""
        one = SamplingConfig(**{**self.sampling.__dict__, "n": 1})
        started = time.time()
        for piece in self.generator.stream(prompts, one, seeds, piece_size, logprobs=True):
            yield {
                "indices": [i for i, _ in piece],
                "samples": [s[0] for _, s in piece],
                "started": started,
                "finished": time.time(),
            }

    def engine_stats(self) -> dict[str, Any]:
        """Engine steps since the last call, the mean sequences in flight per step and the
        prompts of each ``generate`` call."""
        stats, self.generator.stats = self.generator.stats, StreamStats()
        calls, self.calls = self.calls, []
        return {"steps": stats.steps, "mean_batch": stats.mean_batch, "calls": calls}

    # ---------------------------------------------------------------- hybrid engine

    def sleep(self) -> bool:
        """vLLM on GPUs with sleep mode: weights to CPU memory, KV cache freed, while a colocated
        policy trains. Elsewhere nothing to free (CPU: no sleep mode); returns whether it slept."""
        if not self._can_sleep():
            return False
        self.generator.llm.sleep(level=1)
        return True

    def wake_up(self) -> None:
        if self._can_sleep():
            self.generator.llm.wake_up()

    def _can_sleep(self) -> bool:
        if isinstance(self.generator, HFGenerator):
            return False
        return bool(self.generator.llm.llm_engine.vllm_config.model_config.enable_sleep_mode)

    # ---------------------------------------------------------------- weight sync

    def engine_ranks(self) -> int:
        """Processes of this engine that join the weight-sync group (vLLM: one per TP rank)."""
        if isinstance(self.generator, HFGenerator):
            return 1
        return self.tensor_parallel_size

    def join_sync_group(self, addr: str, port: int, rank: int, world: int, backend: str) -> None:
        if isinstance(self.generator, HFGenerator):
            self.sync_group = weight_sync.join_group(addr, port, rank, world, backend)
        else:
            self.generator.llm.collective_rpc(
                "huatuo_join_sync_group", args=(addr, port, rank, world, backend)
            )

    def receive_broadcast(self, specs: list[weight_sync.ParamSpec], bucket_bytes: int) -> dict:
        """One update from the broadcast group, streamed bucket by bucket into the engine;
        ``{"tensors", "bytes", "peak_buckets"}`` (buckets held at once: 1)."""
        if isinstance(self.generator, HFGenerator):
            device = next(self.generator.model.parameters()).device
            meter = weight_sync.BucketMeter()
            received = weight_sync.receive_buckets(
                self.sync_group, specs, bucket_bytes, device, meter
            )
            weight_sync.copy_into(self.generator.model, received)
            return meter.summary()
        stats = self.generator.llm.collective_rpc(
            "huatuo_receive_broadcast", args=(specs, bucket_bytes)
        )[0]
        self.generator.llm.reset_prefix_cache()  # cached KV blocks came from the old weights
        return stats

    def receive_shared(
        self, handle: tuple[str, Any], specs: list[weight_sync.ParamSpec], bucket: list[int]
    ) -> dict:
        """The ``ipc`` path: one bucket of the colocated policy rank, by handle
        (:func:`~huatuo_ray.rlmf.weight_sync.share`), copied into the engine's weights."""
        if isinstance(self.generator, HFGenerator):
            device = next(self.generator.model.parameters()).device
            flat = weight_sync.open_shared(handle, device)
            n = weight_sync.copy_into(
                self.generator.model, weight_sync.bucket_tensors(flat, specs, bucket)
            )
            return {"tensors": n, "bytes": flat.numel() * flat.element_size(), "peak_buckets": 1}
        stats = self.generator.llm.collective_rpc(
            "huatuo_receive_shared", args=(handle, specs, bucket)
        )[0]
        self.generator.llm.reset_prefix_cache()
        return stats

    def copy_weights_from(self, named: Iterator[tuple[str, Any]]) -> dict:
        """The ``in_process`` path: the policy's tensors, in this process, copied into the HF
        engine's weights (no vLLM here: it keeps a process of its own)."""
        meter = {"tensors": 0, "bytes": 0, "peak_buckets": 0}

        def counted() -> Iterator[tuple[str, Any]]:
            for name, tensor in named:
                meter["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor

        meter["tensors"] = weight_sync.copy_into(self.generator.model, counted())
        return meter

    def load_weights(self, named: list[tuple[str, Any]]) -> dict:
        """The object-store path: ``named`` arrives as a Ray object (resolved by Ray)."""
        if isinstance(self.generator, HFGenerator):
            n = weight_sync.copy_into(self.generator.model, named)
            size = sum(t.numel() * t.element_size() for _, t in named)
            return {"tensors": n, "bytes": size, "peak_buckets": 1}
        stats = self.generator.llm.collective_rpc("huatuo_load_weights", args=(named,))[0]
        self.generator.llm.reset_prefix_cache()
        return stats
