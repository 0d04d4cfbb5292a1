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
    """Create every group into ``groups`` on its placement group (colocated groups share one).
    First the placement groups are checked against the cluster's nodes, then created and waited
    for (``placement_timeout_s``): a request the cluster cannot hold raises :class:`UserError`
    in one line before any actor starts. Each worker's torch threads follow its placement and
    the groups that take turns with it (:func:`turns`,
    :func:`~huatuo_ray.rlmf.actors.group.torch_threads`)."""
    import ray

    from huatuo_ray.inputs import UserError
    from huatuo_ray.rlmf.actors import group as actor_group
    from huatuo_ray.rlmf.actors.critic import CriticWorker
    from huatuo_ray.rlmf.actors.frozen import ReferenceWorker, RewardWorker
    from huatuo_ray.rlmf.actors.patient import PatientWorker
    from huatuo_ray.rlmf.actors.policy import PolicyWorker
    from huatuo_ray.rlmf.actors.rollout import RolloutWorker
    from huatuo_ray.rlmf.rewards import FunctionRewardWorker
    from huatuo_ray.rlmf.teacher_reward import TeacherRewardWorker

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
    )

    def group(name: str, actor_class: type, *args: Any, **kwargs: Any) -> Any:
        placement, share = shared[name]
        return actor_group.ActorGroup(
            name, actor_class, resources[name], args, placement, share,
            threads=threads[name], **kwargs,
        )  # fmt: skip

    groups["policy"] = group("policy", PolicyWorker, config, config.policy)
    if config.algorithm.uses_critic:  # the critic-free estimators need no value model
        groups["critic"] = group("critic", CriticWorker, config, config.critic)
    for name, source in zip(reward_group_names(config), config.reward_sources):
        if source.kind == "function":
            args = (source.function, source.fallback, config.model.path, source.granularity)
            groups[name] = group(name, FunctionRewardWorker, *args)
        elif source.kind == "teacher":
            cache = os.path.join(config.output, "_teacher_cache", name)
            args = (source.teacher, config.sampling.n, source.fallback, config.model.path, cache)
            groups[name] = group(name, TeacherRewardWorker, *args)
        else:
            groups[name] = group(name, RewardWorker, source.model, source.normalise)
    if not config.reference.frozen_trunk:
        groups["reference"] = group(
            "reference",
            ReferenceWorker,
            config.model,
            config.sampling.temperature,
            config.pack,
            config.micro_batch_size,
        )
    groups["rollout"] = group(
        "rollout",
        RolloutWorker,
        config.model.path,
        config.rollout.engine,
        config.sampling,
        # vLLM's engine in the actor's own process (its multiprocessing engine cannot take
        # weights in place on CPUs, and one process per engine is simpler to place).
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    if config.rollout.mode == "consultation":
        ask = config.rollout.consultation
        cache = os.path.join(config.output, "_teacher_cache", "patient")
        groups["patient"] = group(
            "patient", PatientWorker, ask.patient, cache, ask.max_parse_retries, ask.budget
        )
