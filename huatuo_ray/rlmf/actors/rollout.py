"""Rollout worker: one generation engine (vLLM, tensor-parallel over its GPUs, or HF generate)
that samples responses for chunks of prompts and takes new policy weights after each update."""

from __future__ import annotations

from typing import Any

from huatuo_ray.inference.generation import (
    EngineConfig,
    HFGenerator,
    Sample,
    SamplingConfig,
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

    @property
    def backend(self) -> str:
        return "vllm" if isinstance(self.generator, VLLMGenerator) else "hf"

    def generate(self, prompts: list[list[int]], seeds: list[int]) -> list[Sample]:
        """One response per prompt, with the engine's log-prob of each sampled token (the driver
        compares them with the policy's: a check that weight sync worked). Seeded."""
        one = SamplingConfig(**{**self.sampling.__dict__, "n": 1})
        return [s[0] for s in self.generator.generate(prompts, one, seeds, logprobs=True)]

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

    def receive_broadcast(self, specs: list[weight_sync.ParamSpec]) -> int:
        if isinstance(self.generator, HFGenerator):
            device = next(self.generator.model.parameters()).device
            received = weight_sync.receive(self.sync_group, specs, device)
            return weight_sync.copy_into(self.generator.model, received)
        n = self.generator.llm.collective_rpc("huatuo_receive_broadcast", args=(specs,))[0]
        self.generator.llm.reset_prefix_cache()  # cached KV blocks came from the old weights
        return n

    def load_weights(self, named: list[tuple[str, Any]]) -> int:
        """The object-store path: ``named`` arrives as a Ray object (resolved by Ray)."""
        if isinstance(self.generator, HFGenerator):
            return weight_sync.copy_into(self.generator.model, named)
        n = self.generator.llm.collective_rpc("huatuo_load_weights", args=(named,))[0]
        self.generator.llm.reset_prefix_cache()
        return n
