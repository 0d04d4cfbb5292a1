"""Actor groups on placement groups: how PPO's workers land on GPUs and nodes.

Each group reserves one bundle per worker (``num_cpus``/``num_gpus`` of its resources) in a
placement group: rollout engines with the ``SPREAD`` strategy by default, so N engines use the
nodes there are; the model groups ``PACK``. Groups named together in ``colocate`` share one
placement group: worker i of each lands in bundle i and they split its GPUs, the way a policy and
its reference, or a critic and the reward model, can share devices when memory allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from huatuo_ray.config import option


@dataclass
class Resources:
    """Workers of one actor group and what each reserves."""

    workers: int = option(1, help="workers in the group (data-parallel ranks or engines)")
    num_cpus: float = option(1.0, help="CPUs per worker")
    num_gpus: float = option(
        0.0, help="GPUs per worker (a rollout engine: its tensor-parallel size)"
    )

    def __post_init__(self) -> None:
        if self.workers < 1 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("workers must be >= 1, num_cpus and num_gpus >= 0")


def _bundle(num_cpus: float, num_gpus: float) -> dict[str, float]:
    bundle = {"CPU": max(num_cpus, 0.01)}  # a bundle may not be empty
    if num_gpus:
        bundle["GPU"] = num_gpus
    return bundle


class ActorGroup:
    """``workers`` instances of one actor class, each pinned to a bundle of a placement group."""

    def __init__(
        self,
        name: str,
        actor_class: type,
        resources: Resources,
        args: tuple = (),
        placement: Any = None,
        gpu_share: float = 1.0,
        strategy: str = "PACK",
        env: dict[str, str] | None = None,
    ):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name = name
        if placement is None:
            bundles = [_bundle(resources.num_cpus, resources.num_gpus)] * resources.workers
            placement = placement_group(bundles, strategy=strategy, name=f"ppo-{name}")
        self.placement = placement
        remote = ray.remote(actor_class)
        self.workers = [
            remote.options(
                name=f"ppo-{name}-{i}",
                num_cpus=resources.num_cpus,
                num_gpus=resources.num_gpus * gpu_share,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement, placement_group_bundle_index=i
                ),
                runtime_env={"env_vars": env} if env else None,
                max_concurrency=1,
            ).remote(*args)
            for i in range(resources.workers)
        ]

    def shutdown(self) -> None:
        """Kill the workers and free their placement group (shared ones: by the last user)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w)
        try:
            remove_placement_group(self.placement)
        except Exception:  # noqa: BLE001 - already removed with a colocated group
            pass

    def __len__(self) -> int:
        return len(self.workers)

    def call(self, method: str, *args: Any) -> list[Any]:
        """The same call on every worker: a list of ObjectRefs."""
        return [getattr(w, method).remote(*args) for w in self.workers]

    def call_shards(self, method: str, shards: list[Any], *args: Any) -> list[Any]:
        """Worker i gets ``shards[i]``."""
        return [getattr(w, method).remote(s, *args) for w, s in zip(self.workers, shards)]

    def setup_distributed(self, *args: Any) -> list[Any]:
        """Every worker joins one torch.distributed world hosted by worker 0, then builds its
        model: ``setup(addr, port, rank, world, *args)``."""
        import ray

        addr, port = ray.get(self.workers[0].address.remote())
        world = len(self.workers)
        return [
            w.setup.remote(addr, port, rank, world, *args) for rank, w in enumerate(self.workers)
        ]


def colocated_placement(groups: list[str], resources: dict[str, Resources]) -> tuple[Any, float]:
    """One placement group for ``groups``: bundle i holds worker i of each; (group, GPU share)."""
    from ray.util.placement_group import placement_group

    counts = {resources[g].workers for g in groups}
    if len(counts) != 1:
        raise ValueError(f"colocate {groups}: the groups need the same number of workers")
    bundle = _bundle(
        sum(resources[g].num_cpus for g in groups), max(resources[g].num_gpus for g in groups)
    )
    name = "ppo-" + "+".join(groups)
    placement = placement_group([bundle] * counts.pop(), strategy="PACK", name=name)
    return placement, 1.0 / len(groups)
