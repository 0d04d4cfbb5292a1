"""Actor groups on placement groups: how PPO's workers land on GPUs and nodes.

Each group reserves one bundle per worker (``num_cpus``/``num_gpus`` of its resources) in a
placement group: rollout engines with the ``SPREAD`` strategy by default, so N engines use the
nodes there are; the model groups ``PACK``. Groups named together in ``colocate`` share one
placement group: worker i of each lands in bundle i and they split its GPUs, the way a policy and
its reference, or a critic and the reward model, can share devices when memory allows.

Before any actor starts, :func:`unplaceable` checks the whole set of placement groups against the
cluster's nodes (the total of each resource, each bundle on some node, strict strategies); a
placement group that the cluster could hold but that waits longer than ``placement_timeout_s``
(other jobs hold the resources) also ends the stage with one line instead of hanging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from huatuo_ray.config import option
from huatuo_ray.inputs import UserError


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


@dataclass
class PlacementRequest:
    """One placement group as the stage will ask for it: the groups sharing it (one unless
    colocated), one bundle per worker, the strategy, and the config key of each group's
    resources (for the message)."""

    names: list[str]
    bundles: list[dict[str, float]]
    strategy: str = "PACK"
    keys: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "+".join(self.names)

    def asks(self) -> str:
        bundle = self.bundles[0]
        each = ", ".join(f"{k} {_num(v)}" for k, v in bundle.items())
        return f"{self.label} asks {len(self.bundles)} x {{{each}}}"


def _num(value: float) -> str:
    return f"{value:g}"


def _total(bundles: list[dict[str, float]], resource: str) -> float:
    return sum(b.get(resource, 0.0) for b in bundles)


def cluster_nodes() -> list[dict[str, float]]:
    """The CPU and GPU totals of each live node of the connected Ray cluster."""
    import ray

    return [
        {k: float(n["Resources"].get(k, 0.0)) for k in ("CPU", "GPU")}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def unplaceable(requests: list[PlacementRequest], nodes: list[dict[str, float]]) -> str | None:
    """Why ``requests`` can never all be placed on ``nodes`` (one line), or None when they can
    as far as totals, single nodes and strict strategies tell (what they cannot tell, e.g. how
    bundles of several groups pack into nodes, the placement wait catches)."""
    problems = []
    bundles = [b for r in requests for b in r.bundles]
    for resource in ("CPU", "GPU"):
        asked, have = _total(bundles, resource), sum(n.get(resource, 0.0) for n in nodes)
        if asked > have + 1e-9:
            problems.append(f"{resource} {_num(asked)} asked in all, the cluster has {_num(have)}")
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in ("CPU", "GPU")}

    def fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
        return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())

    for r in requests:
        if not any(fits(r.bundles[0], n) for n in nodes):
            problems.append(
                f"a bundle of {r.label} fits on no node (the largest has CPU "
                f"{_num(largest['CPU'])}, GPU {_num(largest['GPU'])})"
            )
        elif r.strategy == "STRICT_PACK":
            whole = {k: _total(r.bundles, k) for k in r.bundles[0]}
            if not any(fits(whole, n) for n in nodes):
                problems.append(f"{r.label} (STRICT_PACK) fits on no single node")
        elif r.strategy == "STRICT_SPREAD":
            hosts = sum(fits(r.bundles[0], n) for n in nodes)
            if hosts < len(r.bundles):
                problems.append(
                    f"{r.label} (STRICT_SPREAD) needs {len(r.bundles)} nodes, {hosts} can host it"
                )
    if not problems:
        return None
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    workers = sum(len(r.bundles) * len(r.names) for r in requests)
    each = max(int(cpus / max(workers, 1) * 100) / 100, 0.01)
    keys = ", ".join(k for r in requests for k in r.keys)
    sizes = ", ".join("{" + ", ".join(f"{k} {_num(v)}" for k, v in n.items()) + "}" for n in nodes)
    return (
        f"the actor groups can never be placed on this cluster: "
        f"{'; '.join(r.asks() for r in requests)}; {'; '.join(problems)} "
        f"({len(nodes)} node(s): {sizes}); fix: lower {keys} (e.g. num_cpus {_num(each)} "
        f"each for {workers} workers on {_num(cpus)} CPUs; num_gpus to what the nodes have), "
        "or give the cluster more (cluster.num_cpus for a local Ray)"
    )


def remove_placements(placements: list[Any]) -> None:
    from ray.util.placement_group import remove_placement_group

    for placement in placements:
        try:
            remove_placement_group(placement)
        except Exception:  # noqa: BLE001 - already removed
            pass


def wait_placed(request: PlacementRequest, placement: Any, timeout_s: float | None) -> None:
    """Wait until ``placement`` is placed; after ``timeout_s`` raise :class:`UserError` with
    what it asks and what the cluster has free (other jobs may hold the rest)."""
    import ray

    if timeout_s is None or placement.wait(timeout_seconds=timeout_s):
        return
    free = ray.available_resources()
    have = ", ".join(f"{k} {_num(free.get(k, 0.0))}" for k in ("CPU", "GPU"))
    raise UserError(
        f"placement of {request.label} not done after {_num(timeout_s)} s: {request.asks()}, "
        f"the cluster has {have} free now; fix: free what other jobs or actors hold, lower "
        f"{', '.join(request.keys)}, or raise placement_timeout_s"
    )


def bundle_nodes(placement: Any) -> list[str]:
    """The node id of each bundle of a placed placement group."""
    from ray.util import placement_group_table

    nodes = placement_group_table(placement)["bundles_to_node_id"]
    return [nodes[i] for i in sorted(nodes)]


def torch_threads(
    requests: list[PlacementRequest],
    nodes_of: list[list[str]],
    phases: list[set[str]],
    node_cpus: dict[str, float],
    shared: list[list[str]] | None = None,
) -> dict[str, list[int]]:
    """torch's intra-op threads for each worker of each group (``{group: [per worker]}``).

    Groups of one phase work at the same time and phases take turns (PPO: generate, then
    experience, then train), so a worker may use, while it is its phase's turn, the CPUs this run
    reserved on its node (every bundle there, whichever group holds it) divided among the
    workers of its busiest phase there; at least 1, at most the node's CPUs. ``nodes_of``: the
    node of each bundle of each request. A group in no phase gets 1 thread. Groups of one
    ``shared`` list run in one process per worker (``colocate_in_process``), one call at a time:
    in a phase they count as one worker."""
    reserved: dict[str, float] = {}
    where: dict[str, list[str]] = {}
    for request, nodes in zip(requests, nodes_of):
        for bundle, node in zip(request.bundles, nodes):
            reserved[node] = reserved.get(node, 0.0) + bundle.get("CPU", 0.0)
        for name in request.names:
            where[name] = nodes

    def processes(phase: set[str]) -> list[str]:  # one group for each shared list in it
        ones: dict[Any, str] = {}
        for g in sorted(phase & set(where)):
            ones.setdefault(next((tuple(s) for s in shared or [] if g in s), g), g)
        return list(ones.values())

    threads = {}
    for name, nodes in where.items():
        counts = []
        for node in nodes:
            busiest = max(
                (sum(where[g].count(node) for g in processes(phase)) for phase in phases
                 if name in phase),
                default=0,
            )  # fmt: skip
            if busiest == 0:
                counts.append(1)
                continue
            share = int(reserved[node] / busiest + 0.5)
            counts.append(max(1, min(share, int(node_cpus.get(node, 1.0)))))
        threads[name] = counts
    return threads


class ActorGroup:
    """``workers`` instances of one actor class, each pinned to a bundle of a placement group,
    worker i with ``threads[i]`` torch threads (:func:`torch_threads`; default 1)."""

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
        threads: list[int] | None = None,
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
        self.threads = threads or [1] * resources.workers
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
        self.processes = self.workers
        # Set by a call rather than OMP_NUM_THREADS in a runtime env, which would keep Ray from
        # reusing its prestarted worker processes; a worker's calls run in order, so every
        # later one runs with these threads (its constructor, loading, runs with Ray's: the
        # actor's CPUs, at least 1).
        for worker, n in zip(self.workers, self.threads):
            worker.set_torch_threads.remote(n)

    @classmethod
    def in_shared_processes(
        cls, name: str, class_path: str, processes: list[Any], placement: Any,
        threads: list[int],
    ) -> ActorGroup:  # fmt: skip
        """The group whose worker i is the ``name`` instance inside shared process i (a
        :class:`~huatuo_ray.rlmf.actors.shared_process.SharedProcessWorker`); calls to its
        workers look the same as to a group of its own."""
        from huatuo_ray.rlmf.actors.shared_process import RoleHandle

        group = cls.__new__(cls)
        group.name, group.placement, group.threads = name, placement, threads
        group.processes = processes
        group.workers = [RoleHandle(p, name, class_path) for p in processes]
        for worker, n in zip(group.workers, threads):
            worker.set_torch_threads.remote(n)
        return group

    def shutdown(self) -> None:
        """Kill the workers' processes and free their placement group (shared ones: by the last
        user; a process shared with other groups dies with the first)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for process in self.processes:
            ray.kill(process)
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


def placement_requests(
    resources: dict[str, Resources],
    colocate: list[list[str]],
    strategies: dict[str, str],
    keys: dict[str, str],
) -> list[PlacementRequest]:
    """The placement groups for the groups of ``resources`` (those the run creates): one per
    group, except that groups named together in ``colocate`` share one whose bundle i holds
    worker i of each (their CPUs summed, the most GPUs any asks, split between them)."""
    requests, taken = [], set()
    for names in colocate:
        names = [n for n in names if n in resources]
        if len(names) < 2:
            continue
        counts = {resources[n].workers for n in names}
        if len(counts) != 1:
            raise ValueError(f"colocate {names}: the groups need the same number of workers")
        bundle = _bundle(
            sum(resources[n].num_cpus for n in names), max(resources[n].num_gpus for n in names)
        )
        requests.append(
            PlacementRequest(names, [bundle] * counts.pop(), "PACK", [keys[n] for n in names])
        )
        taken.update(names)
    for name, res in resources.items():
        if name not in taken:
            bundles = [_bundle(res.num_cpus, res.num_gpus)] * res.workers
            requests.append(
                PlacementRequest([name], bundles, strategies.get(name, "PACK"), [keys[name]])
            )
    return requests


def create_placement(request: PlacementRequest) -> Any:
    from ray.util.placement_group import placement_group

    name = "ppo-" + request.label
    return placement_group(request.bundles, strategy=request.strategy, name=name)
