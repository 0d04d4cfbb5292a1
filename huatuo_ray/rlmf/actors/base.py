"""What every PPO model worker shares: a torch.distributed rank, a device, a DeepSpeed engine.

A group of M workers forms one torch.distributed world of its own (NCCL on GPUs, gloo on CPUs):
the driver asks rank 0 for an address, then every rank joins. Workers of different groups never
share a process group; what they exchange goes through the driver as an
:class:`~huatuo_ray.rlmf.experience.Experience`, or through the weight-sync group.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from huatuo_ray.config import ModelConfig
from huatuo_ray.runtime import free_port
from huatuo_ray.train import core as train_core


def timed(method: Callable) -> Callable:
    """Record the wall-clock (start, end) of each call in the worker's ``timeline`` (the
    rollout schedule measures from these how much scoring overlaps generation)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.time()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.__dict__.setdefault("_timeline", []).append((started, time.time()))

    return wrapper


class ModelWorker:
    """One rank of an actor group."""

    rank = 0
    world_size = 1

    def timeline(self) -> list[tuple[float, float]]:
        """(start, end) of the ``@timed`` calls since the last ``timeline()``; then clears."""
        spans = self.__dict__.pop("_timeline", [])
        return spans

    def address(self) -> tuple[str, int]:
        """(node IP, a free port) for rank 0 to host the group's rendezvous."""
        import ray

        return ray.util.get_node_ip_address(), free_port("")  # every interface

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """This worker's process (groups in shared processes report the same one)."""
        import os

        return os.getpid()

    def set_torch_threads(self, threads: int) -> None:
        """torch's intra-op threads (the group sets them from the placement)."""
        torch.set_num_threads(threads)

    def torch_threads(self) -> int:
        """torch's intra-op threads in this process."""
        return torch.get_num_threads()

    def gpu_memory(self) -> dict[str, float]:
        """On a GPU: this process's peak allocation and the whole device's memory in use now
        (every process on it: colocated groups share it), GiB; {} on a CPU."""
        if not torch.cuda.is_available():
            return {}
        free, total = torch.cuda.mem_get_info()
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "device_used_gib": (total - free) / 2**30,
        }

    @property
    def device(self) -> torch.device:
        return train_core.device_and_backend()[0]

    def dtype(self, model: ModelConfig) -> torch.dtype:
        return train_core.model_dtype(model, None, self.device.type == "cuda")

    def init_distributed(self, master_addr: str, master_port: int, rank: int, world: int) -> None:
        self.rank, self.world_size = rank, world
        on_gpu = self.device.type == "cuda"
        train_core.init_process_group(on_gpu, (master_addr, master_port), rank, world)
