"""The actor groups of a ``ppo`` run (:mod:`~huatuo_ray.rlmf.ppo`): which groups a config
creates, with what resources, which of them work at the same time, and their placement on the
cluster (:mod:`~huatuo_ray.rlmf.actors.group` does the placement groups and ranks)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from huatuo_ray.rlmf.ppo_config import old_logprobs_pass, reward_group_names

if TYPE_CHECKING:
    from huatuo_ray.rlmf.actors.group import Resources
    from huatuo_ray.rlmf.ppo_config import PPOConfig


def group_resources(config: PPOConfig) -> tuple[dict[str, Resources], dict[str, str]]:
    """The groups this run creates, in creation order: (their resources, the config key of
    each). No critic for critic-free estimators, no reference group with the frozen trunk."""
    resources = {"policy": config.policy.resources}
    keys = {"policy": "policy.resources"}
    if config.algorithm.uses_critic:
        resources["critic"], keys["critic"] = config.critic.resources, "critic.resources"
    for i, (name, source) in enumerate(zip(reward_group_names(config), config.reward_sources)):
        resources[name] = source.resources
        keys[name] = "reward.resources" if i == 0 else f"extra_rewards[{i - 1}].resources"
    if not config.reference.frozen_trunk:
        resources["reference"] = config.reference.resources
        keys["reference"] = "reference.resources"
    resources["rollout"], keys["rollout"] = config.rollout.resources, "rollout.resources"
    if config.rollout.mode == "consultation":
        resources["patient"] = config.rollout.consultation.resources
        keys["patient"] = "rollout.consultation.resources"
    return resources, keys


def turns(config: PPOConfig) -> list[set[str]]:
    """The groups that do model work at the same time, phase by phase of an iteration: the
    engines generate; the policy (its pass, when it runs), critic, reference and reward models
    score; policy and critic train. (Function and teacher rewards do no model work. Streamed
    pieces scored while an engine still decodes overlap the first two for that while.)"""
    model_rewards = {
        name
        for name, source in zip(reward_group_names(config), config.reward_sources)
        if source.kind == "model"
    }
    experience = {"critic", "reference", *model_rewards}
    if old_logprobs_pass(config):
        experience.add("policy")
    return [{"rollout"}, experience, {"policy", "critic"}]


def place_actor_groups(config: PPOConfig, groups: dict[str, Any]) -> None:
    """Create every group into ``groups`` on its placement group (colocated groups share one;
    with ``colocate_in_process`` their workers share processes: :func:`start_shared`).
    First the placement groups are checked against the cluster's nodes, then created and waited
    for (``placement_timeout_s``): a request the cluster cannot hold raises :class:`UserError`
    in one line before any actor starts. Each worker's torch threads follow its placement and
    the groups that take turns with it (:func:`turns`,
    :func:`~huatuo_ray.rlmf.actors.group.torch_threads`)."""
    import ray

    from huatuo_ray.inputs import UserError
    from huatuo_ray.rlmf.actors import group as actor_group
    from huatuo_ray.rlmf.actors.shared_process import worker_class

    specs = group_specs(config)
    in_process = shared_processes(config, list(specs)) if config.colocate_in_process else []
    alone = [n for n in specs if not any(n in names for names in in_process)]
    # Groups of their own need their classes here (Ray ships an actor's class from its driver);
    # imported before any placement exists, so that a failing import leaves none behind.
    classes = {name: worker_class(specs[name][0]) for name in alone}

    resources, keys = group_resources(config)
    requests = actor_group.placement_requests(
        resources, config.colocate, {"rollout": config.rollout.strategy}, keys
    )
    why = actor_group.unplaceable(requests, actor_group.cluster_nodes())
    if why:
        raise UserError(why)
    shared: dict[str, tuple[Any, float]] = {}
    placements = [actor_group.create_placement(r) for r in requests]  # all asked at once
    try:
        for request, placement in zip(requests, placements):
            actor_group.wait_placed(request, placement, config.placement_timeout_s)
            shared.update({n: (placement, 1.0 / len(request.names)) for n in request.names})
    except UserError:
        actor_group.remove_placements(placements)
        raise

    threads = actor_group.torch_threads(
        requests,
        [actor_group.bundle_nodes(p) for p in placements],
        turns(config),
        {n["NodeID"]: float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]},
        in_process,
    )
    for name, (_, args, env) in specs.items():
        if name in groups:  # created with the other groups of its shared processes
            continue
        together = next((names for names in in_process if name in names), None)
        if together:
            groups.update(start_shared(together, specs, resources, shared[name][0], threads))
            continue
        placement, share = shared[name]
        groups[name] = actor_group.ActorGroup(
            name, classes[name], resources[name], args, placement, share,
            threads=threads[name], env=env or None,
        )  # fmt: skip


def group_specs(config: PPOConfig) -> dict[str, tuple[str, tuple, dict[str, str]]]:
    """What each group of the run runs, in creation order: (its worker class as
    ``"module:Class"``, the constructor's arguments, its environment). By path, so that shared
    processes import their classes themselves and the driver can start them before it imports
    torch (start-up on few CPUs)."""
    actors = "huatuo_ray.rlmf.actors"
    specs: dict[str, tuple[str, tuple, dict[str, str]]] = {}
    specs["policy"] = (f"{actors}.policy:PolicyWorker", (config, config.policy), {})
    if config.algorithm.uses_critic:  # the critic-free estimators need no value model
        specs["critic"] = (f"{actors}.critic:CriticWorker", (config, config.critic), {})
    for name, source in zip(reward_group_names(config), config.reward_sources):
        if source.kind == "function":
            args = (source.function, source.fallback, config.model.path, source.granularity)
            specs[name] = ("huatuo_ray.rlmf.rewards:FunctionRewardWorker", args, {})
        elif source.kind == "teacher":
            cache = os.path.join(config.output, "_teacher_cache", name)
            args = (source.teacher, config.sampling.n, source.fallback, config.model.path, cache)
            specs[name] = ("huatuo_ray.rlmf.teacher_reward:TeacherRewardWorker", args, {})
        else:
            args = (source.model, source.normalise)
            specs[name] = (f"{actors}.frozen:RewardWorker", args, {})
    if not config.reference.frozen_trunk:
        args = (config.model, config.sampling.temperature, config.pack, config.micro_batch_size)
        specs["reference"] = (f"{actors}.frozen:ReferenceWorker", args, {})
    # vLLM's engine in the actor's own process (its multiprocessing engine cannot take weights
    # in place on CPUs, and one process per engine is simpler to place). Not for an HF engine:
    # an environment keeps Ray from starting the actor in one of its prestarted processes.
    hf = config.rollout.engine.backend == "hf"
    engine_env = {} if hf else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    args = (config.model.path, config.rollout.engine, config.sampling)
    specs["rollout"] = (f"{actors}.rollout:RolloutWorker", args, engine_env)
    if config.rollout.mode == "consultation":
        ask = config.rollout.consultation
        cache = os.path.join(config.output, "_teacher_cache", "patient")
        args = (ask.patient, cache, ask.max_parse_retries, ask.budget)
        specs["patient"] = (f"{actors}.patient:PatientWorker", args, {})
    return specs


def shared_processes(config: PPOConfig, created: list[str]) -> list[list[str]]:
    """The colocate lists whose groups this run creates two or more of: each becomes one
    process per worker with ``colocate_in_process``."""
    lists = [[n for n in names if n in created] for names in config.colocate]
    return [names for names in lists if len(names) > 1]


def start_shared(
    names: list[str],
    specs: dict[str, tuple[str, tuple, dict[str, str]]],
    resources: dict[str, Resources],
    placement: Any,
    threads: dict[str, list[int]],
) -> dict[str, Any]:
    """The groups ``names`` in shared processes on their (shared) placement group: process i
    reserves bundle i whole and holds worker i of each group, and runs each group's calls with
    that group's torch threads (the groups take turns in it)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from huatuo_ray.rlmf.actors import group as actor_group
    from huatuo_ray.rlmf.actors.shared_process import SharedProcessWorker

    workers = resources[names[0]].workers
    env = {k: v for n in names for k, v in specs[n][2].items()}
    remote = ray.remote(SharedProcessWorker)
    processes = [
        remote.options(
            name=f"ppo-{'+'.join(names)}-{i}",
            num_cpus=sum(resources[n].num_cpus for n in names),
            num_gpus=max(resources[n].num_gpus for n in names),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=placement, placement_group_bundle_index=i
            ),
            runtime_env={"env_vars": env} if env else None,
            max_concurrency=1,
        ).remote([(n, specs[n][0], specs[n][1]) for n in names])
        for i in range(workers)
    ]
    return {
        n: actor_group.ActorGroup.in_shared_processes(
            n, specs[n][0], processes, placement, threads[n]
        )
        for n in names
    }
