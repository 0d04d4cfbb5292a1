"""What every PPO model worker shares: a torch.distributed rank, a device, a DeepSpeed engine.

A group of M workers forms one torch.distributed world of its own (NCCL on GPUs, gloo on CPUs):
the driver asks rank 0 for an address, then every rank joins. Workers of different groups never
share a process group; what they exchange goes through the driver as an
:class:`~huatuo_ray.rlmf.experience.Experience`, or through the weight-sync group.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from huatuo_ray.config import ModelConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ModelWorker:
    """One rank of an actor group."""

    rank = 0
    world_size = 1

    def address(self) -> tuple[str, int]:
        """(node IP, a free port) for rank 0 to host the group's rendezvous."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def dtype(self, model: ModelConfig) -> torch.dtype:
        if model.dtype != "auto":
            return getattr(torch, model.dtype)
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def init_distributed(self, master_addr: str, master_port: int, rank: int, world: int) -> None:
        import deepspeed

        self.rank, self.world_size = rank, world
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK="0",  # Ray gives each worker its own GPU(s): device 0 here
        )
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world,
        )


def deepspeed_engine(
    module: torch.nn.Module,
    ds: Any,
    optim: Any,
    micro_batch: int,
    accumulation: int,
    total_steps: int,
    on_gpu: bool,
) -> tuple[Any, Any]:
    """A DeepSpeed engine over ``module``'s trainable parameters and its LR schedule."""
    import deepspeed

    from huatuo_ray.train import deepspeed_setup as ds_setup

    bf16 = ds_setup.use_bf16(ds, on_gpu)
    optimizer = ds_setup.make_optimizer(module, ds, optim, on_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds_setup.engine_config(ds, optim, micro_batch, accumulation, bf16),
    )
    base_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        base_optimizer,
        lambda step: ds_setup.warmup_cosine(
            step, total_steps, optim.warmup_ratio, optim.min_lr_ratio
        ),
    )
    return engine, schedule


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Means of scalar stats over the group's ranks."""
    import torch.distributed as dist

    if not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))
