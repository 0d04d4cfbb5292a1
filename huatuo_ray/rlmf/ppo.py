"""Stage ``ppo``: RLMF's last step, PPO against the reward model with a KL penalty to the SFT model.

    python -m huatuo_ray ppo --config jobs/tiny/ppo.yaml

The driver (this file, no GPU) places the actor groups (:mod:`~huatuo_ray.rlmf.actors`) and runs
one iteration after another:

1. **rollout**: ``rollout_size`` prompts (the paper: 64) go to the rollout engines on the
   ``rollout.schedule`` (:mod:`~huatuo_ray.rlmf.rollout_schedule`): ``streamed`` (default) hands
   each engine its whole share at once and takes finished prompts back in pieces of
   ``rollout.chunk_size``; ``chunked`` (the paper's) sends chunks of 8, one call each; each engine
   samples one response per prompt;
2. **experience**: for each piece, started as soon as it arrives, the policy's log-probs of the
   sampled tokens (plus the reference's, from its frozen trunk or a separate reference group), the
   critic's values and the reward model's normalised score; the driver then puts the rows back in
   prompt order and computes the per-token KL, r = r_RM - beta * KL, GAE advantages and returns
   (:mod:`~huatuo_ray.rlmf.ppo_math`). The policy's pass is left out when it is redundant
   (:func:`old_logprobs_pass`: one optimizer step per rollout, a separate reference, no KL in
   the rewards); the training forward then supplies the old log-probs and the KL figures, and
   the manifest's ``passes`` says which passes ran;
3. **train**: policy and critic, concurrently, run ``ppo_epochs`` over shuffled minibatches;
4. **sync**: the policy's trainable weights go to every rollout engine
   (:mod:`~huatuo_ray.rlmf.weight_sync`); then the KL controller updates beta.

Responses cut at ``sampling.max_new_tokens`` (no EOS) keep their reward-model score unless
``reward.unfinished_score`` is set, in which case that (normalised) score replaces it: the
reward model never saw cut answers, and a fixed penalty teaches the policy to finish.

Without a critic (``algorithm.advantage`` grpo, dr_grpo, rloo, reinforce_pp,
reinforce_pp_baseline; the ``grpo`` stage's default), each prompt gets ``sampling.n`` answers,
no critic group is created, and the advantages come from each group's rewards
(:mod:`~huatuo_ray.rlmf.advantages`); ``kl.placement: loss`` moves the KL term from the rewards
into the policy loss, with the controller's beta of the iteration (passed to ``train``). The score is the weighted sum of the reward sources (``reward`` and
``extra_rewards``: the reward model, the teacher, a Python function; :mod:`~huatuo_ray.rlmf.rewards`);
a teacher source whose budget is spent stops the run cleanly (``stopped`` in the manifest).

Checkpoints (every ``checkpoint.every_iterations``): policy and critic DeepSpeed states (weights,
optimizer, LR schedule) and the driver's state (iteration, beta, prompt position, metrics) in
``OUTPUT/checkpoints/iter_N``; ``latest`` names the newest complete one. Rerunning the same
command resumes from it. Every random choice derives from ``seed`` and the iteration (prompt order,
sampling seeds, minibatch shuffles), so a resumed run draws what the original would have drawn.
``OUTPUT`` must be a filesystem path every node sees (a shared mount on a cluster).

Output: the final policy as a Hugging Face folder in ``OUTPUT`` (vLLM loads it), ``metrics.jsonl``
(one line per iteration) and the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from huatuo_ray import artifacts, storage
from huatuo_ray.config import ClusterConfig, ModelConfig, option, to_dict
from huatuo_ray.inference.generation import EngineConfig, SamplingConfig
from huatuo_ray.models.fetch import local_model_path
from huatuo_ray.rlmf.actors.group import Resources
from huatuo_ray.rlmf.teacher_reward import TeacherRewardConfig
from huatuo_ray.rlmf.weight_sync import resolve_method
from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config


def _ppo_optim() -> OptimConfig:
    return OptimConfig(lr=1e-6, warmup_ratio=0.0, min_lr_ratio=1.0)  # the paper: constant 1e-6


@dataclass
class PolicyConfig:
    """The policy group (the model is the top-level ``model``)."""

    trainable_layers: int | None = option(
        2, help="train only the top N decoder layers (paper: 2); null: the whole model"
    )
    trainable_modules: list[str] = option(
        ["model.norm", "lm_head"], help="modules trained besides those layers (name prefixes)"
    )
    gradient_checkpointing: bool = option(False, help="recompute activations to save memory")
    optim: OptimConfig = field(default_factory=_ppo_optim)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    resources: Resources = field(default_factory=Resources)


@dataclass
class CriticConfig:
    """The critic group: per-token values, initialised from the reward model by default."""

    model: ModelConfig = field(default_factory=ModelConfig)  # empty path: reward.model
    trainable_layers: int | None = option(2, help="train only the top N layers; null: all")
    trainable_modules: list[str] = option(
        ["model.norm", "score"], help="modules trained besides those layers"
    )
    gradient_checkpointing: bool = option(False, help="recompute activations to save memory")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, warmup_ratio=0.0))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    resources: Resources = field(default_factory=Resources)


@dataclass
class ReferenceConfig:
    """pi_0 for the KL term."""

    mode: Literal["auto", "frozen_trunk", "separate"] = option(
        "auto",
        help="frozen_trunk: the policy's frozen bottom layers + a frozen copy of its top (needs "
        "trainable_layers, ZeRO <= 2); separate: a reference group; auto: frozen_trunk when it can",
    )
    resources: Resources = field(default_factory=Resources)

    @property
    def frozen_trunk(self) -> bool:
        return self.mode == "frozen_trunk"


@dataclass
class RewardConfig:
    """A reward source (:mod:`~huatuo_ray.rlmf.rewards`): the frozen reward model or a function."""

    kind: Literal["model", "teacher", "function"] = option(
        "model",
        help="model: the reward model; teacher: the teacher's rating against the doctor's reply;"
        " function: a Python callable (rule, verifier)",
    )
    weight: float = option(1.0, help="weight of this source in the summed score")
    function: str = option(
        "", help="kind function: 'module:function' of (prompt, response, reference, meta) -> float"
    )
    fallback: float = option(
        0.0, help="kind function/teacher: the score when it raises or cannot rate (counted)"
    )
    teacher: TeacherRewardConfig = field(default_factory=TeacherRewardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    normalise: bool = option(True, help="(score - mean) / std with the RM manifest's statistics")
    unfinished_score: float | None = option(
        None, help="normalised score given to responses cut at max_new_tokens (null: keep the RM's)"
    )
    clip: float | None = option(
        None, help="normalised scores clipped to [-clip, clip] (OpenRLHF: 10); null: off"
    )
    resources: Resources = field(default_factory=Resources)


@dataclass
class RolloutConfig:
    """The rollout engines."""

    engine: EngineConfig = field(default_factory=lambda: EngineConfig(hf_batch_prompts=True))
    resources: Resources = field(default_factory=Resources)
    strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] = option(
        "SPREAD", help="placement of the engines over nodes"
    )
    chunk_size: int = option(
        8,
        help="chunked: prompts per generation call (paper: 8); streamed: prompts per piece "
        "returned and scored, and the unit of the engines' shares",
    )
    schedule: Literal["chunked", "streamed"] = option(
        "streamed",
        help="streamed: each engine gets its whole share at once and returns pieces as they "
        "finish, scored while it decodes; chunked: one chunk per call, scoring after the last",
    )
    balance: Literal["count", "length"] = option(
        "count", help="streamed: share chunks among engines by count or by prompt tokens"
    )


@dataclass
class KLConfig:
    """The KL penalty."""

    init_beta: float = option(0.1, help="initial KL coefficient (paper: 0.1)")
    target: float | None = option(None, help="adaptive controller's target KL; null: fixed beta")
    horizon: int = option(10_000, help="adaptive controller's horizon in samples")
    estimator: Literal["k1", "k2", "k3"] = option(
        "k1",
        help="per-token KL estimate (trlx: k1); with placement loss k2 or k3 (GRPO: k3), as k1's "
        "gradient there is zero in expectation",
    )
    log_ratio_clamp: float | None = option(
        20.0, help="|log pi/pi_ref| bound before the estimate (veRL: 20); null: none"
    )
    clamp: float | None = option(
        10.0, help="per-token KL estimate bound [-c, c] (OpenRLHF, veRL: 10); null: none"
    )
    placement: Literal["reward", "loss"] = option(
        "reward",
        help="reward: -beta KL in the token rewards (PPO); loss: beta KL added to the policy "
        "loss per token (GRPO, with k3); either way beta is the controller's (moves with target)",
    )

    def __post_init__(self) -> None:
        if self.placement == "loss" and self.estimator == "k1":
            raise ValueError(
                "kl.placement: loss with kl.estimator: k1 has zero expected gradient; set"
                " kl.estimator: k3 (GRPO's) or k2"
            )


@dataclass
class AlgorithmConfig:
    """How advantages are estimated (:mod:`~huatuo_ray.rlmf.advantages`)."""

    advantage: Literal[
        "gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"
    ] = option(
        "gae",
        help="gae: a critic (PPO); the others need none and sample sampling.n answers per prompt",
    )
    dynamic_filtering: bool = option(
        False, help="drop groups whose rewards are all equal and sample more prompts to refill"
    )
    max_filter_rounds: int = option(4, help="rollouts per iteration at most when filtering")

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"


@dataclass
class CheckpointEvery:
    """Checkpoints of the run."""

    every_iterations: int = option(10, help="checkpoint every N iterations (and at the end)")
    keep: int = option(2, help="checkpoints kept (the newest)")


@dataclass
class PPOConfig:
    """PPO on the reward model (RLMF step 5)."""

    inputs: list[str] = option(
        help="dialogue artifacts of real data: the RL prompts", input="artifact", made_by="data"
    )
    output: str = option(help="folder to write (a filesystem path every node sees)")
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(n=1, temperature=1.0, top_p=1.0)
    )
    kl: KLConfig = field(default_factory=KLConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    extra_rewards: list[RewardConfig] = option(
        [], help="more reward sources, summed with `reward` by their weights"
    )
    weight_sync: Literal["auto", "broadcast", "ipc", "object_store"] = option(
        "auto",
        help="broadcast: NCCL/gloo group (engines on other GPUs or nodes); ipc: handles to the "
        "policy's own memory for engines colocated with it (CUDA IPC; CPU: the object store); "
        "object_store: through Ray's object store; auto: ipc when rollout is colocated with "
        "policy, else broadcast",
    )
    sync_bucket_mb: float = option(
        256.0, help="broadcast sync: MiB per bucket (the most an engine holds of an update)"
    )
    iterations: int = option(100, help="PPO iterations (rollout + update)")
    rollout_size: int = option(
        64, help="prompts per iteration (paper: 64); rows = rollout_size x sampling.n"
    )
    minibatch_size: int = option(8, help="rows per optimizer step over all workers")
    micro_batch_size: int = option(4, help="rows per forward/backward per worker")
    ppo_epochs: int = option(4, help="passes over each rollout (paper: 4)")
    clip_ratio: float = option(0.2, help="PPO policy ratio clip")
    value_clip: float = option(0.2, help="value clip around the old values")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = option(
        "token_mean",
        help="policy and value losses over all response tokens of an optimizer step (all "
        "micro-batches and ranks): token mean, mean of row token means, or mean of row sums; "
        "advantage grpo keeps GRPO's per-answer weights under each (its length scaling is left "
        "out under seq_mean_token_mean, which divides by length itself)",
    )
    dual_clip: float | None = option(
        None, help="dual-clip constant c > 1: loss <= -A * c for A < 0 (veRL: 3); null: off"
    )
    log_ratio_clamp: float = option(20.0, help="|log pi/pi_old| bound before exp (veRL: 20)")
    tis_cap: float | None = option(
        None,
        help="truncated importance sampling: weight each token by min(pi_old / pi_engine, cap) "
        "for the rollout engine's mismatch (OpenRLHF/veRL: 2); null: off",
    )
    pack: bool = option(
        False,
        help="policy, critic and reference forwards run each batch's rows packed into one "
        "(restarted positions, block-causal mask), so padding costs nothing; pays off with "
        "FlashAttention (varlen by position_ids), while a 4-D mask costs (rows x length)^2",
    )
    gamma: float = option(1.0, help="discount")
    lam: float = option(0.95, help="GAE lambda")
    whiten_advantages: bool = option(True, help="whiten advantages over the rollout")
    max_prompt_tokens: int = option(1024, help="longer prompts are rejected")
    last_turn_only: bool = option(False, help="one prompt per dialogue (its last doctor turn)")
    colocate: list[list[str]] = option(
        [],
        help="groups sharing GPUs, e.g. [[policy, reference], [critic, reward]]; with rollout "
        "next to policy the engines live on the policy's GPUs (hybrid engine; vLLM sleeps "
        "while the policy trains when rollout.engine.sleep_mode)",
    )
    checkpoint: CheckpointEvery = field(default_factory=CheckpointEvery)
    seed: int = option(
        0, help="seed of the prompt order and minibatch shuffles (sampling.seed: of the samples)"
    )
    tensorboard_dir: str | None = option(None, help="TensorBoard logs (default OUTPUT/tensorboard)")
    placement_timeout_s: float | None = option(
        180.0,
        help="seconds to wait for the actor groups' placement groups (other jobs may hold the "
        "resources) before stopping with a message; null: wait forever (an autoscaling cluster)",
    )
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        workers = self.policy.resources.workers
        rows = self.rows
        if rows % self.minibatch_size:
            raise ValueError("rollout_size x sampling.n must be a multiple of minibatch_size")
        for group in ("policy", "critic"):
            n = getattr(self, group).resources.workers
            if self.minibatch_size % (self.micro_batch_size * n):
                raise ValueError(
                    f"minibatch_size must be a multiple of micro_batch_size x {group} workers"
                )
        if self.rollout.chunk_size % workers or rows % self.rollout.chunk_size:
            raise ValueError(
                "rollout_size x sampling.n must be a multiple of rollout.chunk_size, itself a"
                " multiple of the policy workers"
            )
        for group in ("critic", "reference", "reward"):
            if getattr(self, group).resources.workers > self.rollout.chunk_size:
                raise ValueError(f"{group}: more workers than rollout.chunk_size rows to share")
        if self.algorithm.uses_critic and self.sampling.n != 1:
            raise ValueError("advantage gae samples one response per prompt (sampling.n: 1)")
        if not self.algorithm.uses_critic and self.sampling.n < 2:
            raise ValueError(f"advantage {self.algorithm.advantage} needs sampling.n >= 2")
        if self.algorithm.max_filter_rounds < 1:
            raise ValueError("algorithm.max_filter_rounds must be >= 1")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError("dual_clip must be > 1 (veRL: 3), or null for no dual-clip")
        for i, source in enumerate(self.reward_sources):
            if (source.kind == "function") != bool(source.function):
                raise ValueError(f"reward source {i}: `function` is needed by kind function only")
            pairwise = source.kind == "teacher" and source.teacher.mode == "pairwise"
            if pairwise and (
                source.resources.workers != 1 or self.rollout.chunk_size % self.sampling.n
            ):
                raise ValueError(
                    f"reward source {i}: pairwise teacher rewards need whole groups: 1 worker and"
                    " rollout.chunk_size a multiple of sampling.n"
                )
        rollout = self.rollout
        if (
            rollout.resources.num_gpus
            and rollout.resources.num_gpus != rollout.engine.tensor_parallel_size
        ):
            raise ValueError("rollout.resources.num_gpus must equal engine.tensor_parallel_size")
        if self.placement_timeout_s is not None and self.placement_timeout_s <= 0:
            raise ValueError("placement_timeout_s must be > 0, or null to wait forever")
        if self.checkpoint.every_iterations < 1 or self.checkpoint.keep < 1:
            raise ValueError("checkpoint.every_iterations and checkpoint.keep must be >= 1")
        groups = {"policy", "critic", "reference", "reward", "rollout"}
        named = [n for names in self.colocate for n in names]
        if not set(named) <= groups or len(named) != len(set(named)):
            raise ValueError(
                f"colocate: {self.colocate}: groups among policy, critic, reference, reward,"
                " rollout, each in one list at most"
            )
        if "rollout" in named and rollout.engine.tensor_parallel_size > 1:
            raise ValueError("colocate: a colocated rollout engine runs on one GPU (TP 1)")
        on_gpu = rollout.resources.num_gpus > 0 and self.policy.resources.num_gpus > 0
        resolve_method(self.weight_sync, self.colocate, on_gpu)  # refuses what cannot work
        if self.reference.mode == "frozen_trunk" and not _frozen_trunk_possible(self):
            raise ValueError(
                "reference.mode frozen_trunk needs policy.trainable_layers >= 1 and ZeRO <= 2"
            )

    @property
    def rows(self) -> int:
        """Samples per iteration: ``sampling.n`` answers to each of ``rollout_size`` prompts."""
        return self.rollout_size * self.sampling.n

    @property
    def reward_sources(self) -> list[RewardConfig]:
        return [self.reward, *self.extra_rewards]


def reward_group_names(config: PPOConfig) -> list[str]:
    """``reward``, ``reward_1``, ...: one actor group per reward source."""
    return ["reward"] + [f"reward_{i}" for i in range(1, len(config.reward_sources))]


@dataclass
class GRPOConfig(PPOConfig):
    """The ``ppo`` recipe with critic-free defaults (the ``grpo`` stage): GRPO advantages over
    4 answers per prompt, KL (k3) in the loss; any other estimator by ``algorithm.advantage``."""

    algorithm: AlgorithmConfig = field(default_factory=lambda: AlgorithmConfig(advantage="grpo"))
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(n=4, temperature=1.0, top_p=1.0)
    )
    kl: KLConfig = field(default_factory=lambda: KLConfig(placement="loss", estimator="k3"))


def old_logprobs_pass(config: PPOConfig) -> bool:
    """Whether the policy's no-grad pass over the rollout (the "old" log-probs) runs. It is
    redundant, as TRL and veRL skip it, when each iteration is one optimizer step (one epoch,
    one minibatch of all rows): the loss's old log-probs are then the training forward's own,
    detached (ratio 1 by construction, the same gradient). It still runs when it gives
    something else: the reference's log-probs (the frozen trunk) or the KL in the rewards."""
    one_step = config.ppo_epochs == 1 and config.minibatch_size == config.rows
    kl_in_rewards = config.kl.placement == "reward" and (
        config.kl.init_beta != 0 or config.kl.target is not None
    )
    return not one_step or config.reference.frozen_trunk or kl_in_rewards


def experience_passes(config: PPOConfig) -> dict[str, Any]:
    """The passes each iteration runs (the manifest's ``passes``): which model computes what."""
    return {
        "generate": "rollout",
        "policy_old_logprobs": old_logprobs_pass(config),  # false: from the training forward
        "reference_logprobs": "policy (frozen trunk)"
        if config.reference.frozen_trunk
        else "reference",
        "values": config.algorithm.uses_critic,
        "rewards": [source.kind for source in config.reward_sources],
        "train": ["policy", "critic"] if config.algorithm.uses_critic else ["policy"],
        "kl_measured_by": "driver" if old_logprobs_pass(config) else "policy train pass",
    }


def teacher_groups(config: PPOConfig) -> list[str]:
    names = zip(reward_group_names(config), config.reward_sources)
    return [name for name, source in names if source.kind == "teacher"]


def _frozen_trunk_possible(config: PPOConfig) -> bool:
    layers = config.policy.trainable_layers
    return layers is not None and layers >= 1 and config.policy.deepspeed.zero_stage < 3


def resolve_reference(config: PPOConfig, tied_embeddings: bool) -> str:
    """``auto`` -> frozen_trunk when only top layers train under ZeRO <= 2 and the head is not
    tied to the input embeddings (the trunk would then train); else a separate reference."""
    if config.reference.mode == "frozen_trunk" and tied_embeddings:
        raise ValueError("reference.mode frozen_trunk: the model ties its head to its embeddings")
    if config.reference.mode != "auto":
        return config.reference.mode
    return "frozen_trunk" if _frozen_trunk_possible(config) and not tied_embeddings else "separate"


# --------------------------------------------------------------------------- the recipe


def main(config: PPOConfig) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from huatuo_ray.runtime import connect

    started = time.time()  # start-up (the manifest's startup_s) counts from here
    connect(config.cluster, "ppo")
    if storage.exists(os.path.join(config.output, artifacts.MANIFEST)):
        return artifacts.read_manifest(config.output)
    _absolute_paths(config)
    os.makedirs(config.output, exist_ok=True)
    local = local_model_path(config.model.path)  # each actor fetches on its own node
    tokenizer = AutoTokenizer.from_pretrained(local)
    model_config = AutoConfig.from_pretrained(
        local, trust_remote_code=config.model.trust_remote_code
    )
    config.reference.mode = resolve_reference(
        config, bool(getattr(model_config, "tie_word_embeddings", False))
    )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    total_steps = (  # optimizer steps, for the LR schedule
        config.iterations * config.ppo_epochs * (config.rows // config.minibatch_size)
    )
    groups: dict[str, Any] = {}
    try:
        place_actor_groups(config, groups)  # the actors load their models meanwhile
        prompts = PromptStream(config, tokenizer)
        return run(config, groups, prompts, pad_id, total_steps, started)
    finally:  # also when placing failed half-way
        for group in groups.values():
            group.shutdown()


def run(
    config: PPOConfig,
    groups: dict[str, Any],
    prompts: PromptStream,
    pad_id: int,
    total_steps: int,
    started: float | None = None,
) -> dict[str, Any]:
    """Set the groups up, resume if there is a checkpoint, then iterate. ``started``: the
    stage's start (``time.time()``), from which ``startup_s`` (to the first iteration's start)
    and each record's ``elapsed_s`` count."""
    import ray

    from huatuo_ray.rlmf import ppo_math, weight_sync

    started = started or time.time()
    phases: dict[str, float] = {}  # seconds from the stage's start at which each step ended

    def mark(step: str) -> None:
        phases[step] = round(time.time() - started, 3)

    mark("placed")
    trained = [name for name in ("policy", "critic") if name in groups]  # no critic: critic-free
    ray.get([ref for name in trained for ref in groups[name].setup_distributed(total_steps)])
    mark("trainers_ready")
    placement = {name: ray.get(group.call("node_id")) for name, group in groups.items()}
    placement["threads"] = {name: ray.get(g.call("torch_threads")) for name, g in groups.items()}
    mark("all_loaded")
    sync = weight_sync.WeightSync(config, groups)
    placement["weight_sync"] = sync.method
    mark("sync_ready")

    state = load_latest_checkpoint(config, groups, prompts)
    if state["iteration"] > 0:
        sync.push()  # the engines still hold the SFT weights
    kl_control = ppo_math.KLController(state["beta"], config.kl.target, config.kl.horizon)
    metrics = PPOMetrics(config, started)
    timing: dict[str, Any] = {"startup_s": round(time.time() - started, 3)}
    timing["startup_steps"] = phases
    log.warning("ppo: start-up %.1f s (to the first iteration): %s", timing["startup_s"], phases)

    while state["iteration"] < config.iterations:
        iteration = state["iteration"]
        times: dict[str, float] = {}
        counts: dict[str, float] = {}
        figures: dict[str, float] = {}
        ray.get([r for n in teacher_groups(config) for r in groups[n].call("begin_iteration")])
        beta = kl_control.beta  # this iteration's: in the rewards or in the policy loss
        exp = collect_experience(
            config, groups, prompts, pad_id, iteration, beta, times, counts, figures
        )
        if counts.get("budget_spent"):  # stop cleanly: no training on a partly judged rollout
            state["stopped"] = "teacher budget spent"
            log.warning("ppo: teacher budget spent at iteration %d: stopping", iteration + 1)
            if iteration > 0:
                save_checkpoint(config, groups, state)
            break

        # 3. train policy and critic (if any) concurrently on the same rows (colocated engines
        # asleep)
        started = time.perf_counter()
        hybrid_engine(config, groups, awake=False)
        refs = {
            n: groups[n].call_shards("train", exp.shards(len(groups[n])), iteration, beta)
            for n in trained
        }
        stats = {n: ray.get(r)[0] for n, r in refs.items()}  # rank 0's: means over ranks
        policy_stats, critic_stats = stats["policy"], stats.get("critic", {})
        times["train_s"] = time.perf_counter() - started

        # 4. weight sync, then the KL controller
        started = time.perf_counter()
        hybrid_engine(config, groups, awake=True)  # wake first: the sync writes into the engines
        sync.push()
        times["sync_s"] = time.perf_counter() - started
        figures.update(sync.last)
        figures.update(gpu_memory(groups))
        if exp.logprobs is None:  # measured by the training forward (the same weights)
            sequence_kl = policy_stats.pop("sequence_kl")
        else:
            sequence_kl = float(exp.kl.sum(-1).mean())
        kl_control.update(sequence_kl, len(exp))

        state["iteration"] = iteration + 1
        state["beta"] = kl_control.beta
        state["position"] = prompts.position
        record = metrics.log(
            iteration + 1,
            exp,
            beta,
            sequence_kl,
            {**policy_stats, **counts},
            critic_stats,
            times,
            figures,
        )
        state["history"].append(record)
        timing.setdefault("first_iteration_s", round(record["elapsed_s"] - timing["startup_s"], 3))
        done = state["iteration"] == config.iterations
        if done or state["iteration"] % config.checkpoint.every_iterations == 0:
            save_checkpoint(config, groups, state)

    metrics.close()
    return finish(config, groups, state, prompts, placement, timing)


def collect_experience(
    config: PPOConfig,
    groups: dict[str, Any],
    prompts: PromptStream,
    pad_id: int,
    iteration: int,
    beta: float,
    times: dict[str, float],
    counts: dict[str, float] | None = None,
    figures: dict[str, float] | None = None,
) -> Any:
    """Steps 1 and 2 of an iteration: the rollout on the schedule ``rollout.schedule``
    (:mod:`~huatuo_ray.rlmf.rollout_schedule`), each piece's log-probs, values and scores started
    as it arrives, joined in prompt order into one Experience with its rewards and advantages
    (KL penalty ``beta``). ``sampling.n`` answers per prompt lie in consecutive rows
    (a group); with ``algorithm.dynamic_filtering`` groups of equal :func:`final_scores` (after
    ``unfinished_score`` and ``clip``) are dropped and more prompts drawn
    (:func:`~huatuo_ray.rlmf.filtering.informative_rollout`). ``counts`` gets the
    reward functions' errors and the groups filtered out; ``figures`` ``overlap_fraction`` and
    ``engine_batch``."""
    from huatuo_ray.rlmf.filtering import informative_rollout

    counts = {} if counts is None else counts

    def sample() -> Any:  # final scores, so that filtering judges what will train
        exp = sample_and_score(config, groups, prompts, pad_id, iteration, times, counts, figures)
        return final_scores(exp, config)

    exp = informative_rollout(config, sample, counts, pad_id)
    started = time.perf_counter()
    add_rewards_and_advantages(exp, beta, config)
    times["experience_s"] += time.perf_counter() - started
    return exp


def sample_and_score(
    config: PPOConfig,
    groups: dict[str, Any],
    prompts: PromptStream,
    pad_id: int,
    iteration: int,
    times: dict[str, float],
    counts: dict[str, float],
    figures: dict[str, float] | None = None,
) -> Any:
    """One rollout of ``rollout_size`` prompts x ``sampling.n`` answers on the schedule
    ``rollout.schedule``, with the models' log-probs, values (with a critic) and summed reward
    scores, each piece's calls started as it arrives; rows back in prompt order (a group's answers
    consecutive)."""
    import ray
    import torch

    from huatuo_ray.rlmf import rewards, rollout_schedule
    from huatuo_ray.rlmf.experience import concat, make_experience

    started = time.time()
    n = config.sampling.n
    batch = [p.answer(k) for p in prompts.next_batch(config.rollout_size) for k in range(n)]
    ids = [p.ids for p in batch]
    seeds = [p.seed(config.sampling.seed, iteration) for p in batch]
    engines = groups["rollout"].workers
    generation: list[tuple[float, float]] = []
    if config.rollout.schedule == "streamed":
        pieces = rollout_schedule.streamed(
            engines, ids, seeds, config.rollout.chunk_size, config.rollout.balance, generation
        )
    else:
        pieces = rollout_schedule.chunked(
            engines, ids, seeds, config.rollout.chunk_size, generation
        )
    names = reward_group_names(config)
    parts, order = [], []
    for indices, samples in pieces:
        exp = make_experience(
            [ids[i] for i in indices],
            [o.token_ids for o in samples],
            [o.finished for o in samples],
            pad_id,
            [o.logprobs for o in samples],
        )
        calls = experience_calls(
            groups, exp, config.reference.frozen_trunk, old_logprobs_pass(config)
        )
        calls |= rewards.reward_calls(groups, names, exp, [batch[i].info for i in indices])
        parts.append((exp, calls))
        order += indices
    generated = time.time()
    times["generate_s"] = times.get("generate_s", 0.0) + generated - started
    weights = {name: source.weight for name, source in zip(names, config.reward_sources)}
    filled = []
    for exp, calls in parts:
        results = {k: ray.get(v) for k, v in calls.items()}
        fill_experience(exp, results)
        exp.scores, exp.raw_scores, errors, spent = rewards.combine(results, weights)
        counts["reward_errors"] = counts.get("reward_errors", 0) + errors
        if spent:
            counts["budget_spent"] = 1
        filled.append(exp)
    exp = concat(filled, pad_id).select(torch.argsort(torch.tensor(order)))
    times["experience_s"] = times.get("experience_s", 0.0) + time.time() - generated
    if figures is not None:
        figures.update(rollout_schedule.figures(groups, generation))
    return exp


def final_scores(exp: Any, config: PPOConfig) -> Any:
    """The scores that train (and that dynamic filtering judges): cut responses take
    ``reward.unfinished_score`` when it is set, then scores are clipped to ``reward.clip``."""
    import torch

    if config.reward.unfinished_score is not None:
        penalty = torch.tensor(config.reward.unfinished_score, dtype=exp.scores.dtype)
        exp.scores = torch.where(exp.finished, exp.scores, penalty)
    if config.reward.clip is not None:
        exp.scores = exp.scores.clamp(-config.reward.clip, config.reward.clip)
    return exp


def add_rewards_and_advantages(exp: Any, beta: float, config: PPOConfig) -> None:
    """KL per token, r = score - beta * KL (score on the last token), GAE advantages and returns,
    whitened advantages, from the :func:`final_scores`; the KL estimate clamped as ``kl`` says
    (zeros without the old-log-prob pass, which only happens when no KL enters the rewards).
    With ``kl.placement: loss`` the rewards carry no KL (the policy loss does); a critic-free
    estimator replaces GAE (returns are then unused: there is no critic to fit)."""
    import torch

    from huatuo_ray.rlmf import advantages, ppo_math

    mask = exp.action_mask.float()
    kl = config.kl
    if exp.logprobs is None:  # no old-log-prob pass: no KL in the rewards; the policy measures it
        exp.kl = torch.zeros_like(mask)
    else:
        exp.kl = ppo_math.kl_estimate(
            exp.logprobs, exp.ref_logprobs, kl.estimator, kl.log_ratio_clamp, kl.clamp, mask
        )
    reward_beta = beta if kl.placement == "reward" else 0.0
    exp.rewards = ppo_math.token_rewards(exp.scores, exp.kl, mask, reward_beta)
    if not config.algorithm.uses_critic:
        exp.advantages = advantages.critic_free_advantages(
            config.algorithm.advantage,
            exp.scores,
            exp.kl,
            mask,
            config.sampling.n,
            reward_beta,
            config.gamma,
            config.loss_agg,
        )
        exp.returns = torch.zeros_like(mask)
        return
    exp.advantages, exp.returns = ppo_math.gae(
        exp.rewards, exp.values, mask, config.gamma, config.lam
    )
    if config.whiten_advantages:
        exp.advantages = ppo_math.masked_whiten(exp.advantages, mask)


# --------------------------------------------------------------------------- the wiring


def _absolute_paths(config: PPOConfig) -> None:
    """Actors run in other working directories: local paths become absolute."""
    if "://" in config.output:
        raise ValueError("ppo: output must be a filesystem path (checkpoints are written there)")
    config.output = os.path.abspath(config.output)
    if not config.critic.model.path:
        config.critic.model = ModelConfig(**vars(config.reward.model))
    for m in (config.model, config.reward.model, config.critic.model):
        if os.path.exists(m.path):
            m.path = os.path.abspath(m.path)
    if config.tensorboard_dir is None:
        config.tensorboard_dir = os.path.join(config.output, "tensorboard")


def stage_name(config: PPOConfig) -> str:
    return "grpo" if isinstance(config, GRPOConfig) else "ppo"


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
            args = (source.function, source.fallback, config.model.path)
            groups[name] = group(name, FunctionRewardWorker, *args)
        elif source.kind == "teacher":
            cache = os.path.join(config.output, "_teacher_cache", name)
            args = (source.teacher, config.sampling.n, source.fallback, config.model.path, cache)
            groups[name] = group(name, TeacherRewardWorker, *args)
        else:
            groups[name] = group(name, RewardWorker, source.model, source.normalise)
    if not config.reference.frozen_trunk:
        groups["reference"] = group(
            "reference", ReferenceWorker, config.model, config.sampling.temperature, config.pack
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


def gpu_memory(groups: dict[str, Any]) -> dict[str, float]:
    """GPU memory after the iteration (nothing on CPUs): the most any device had in use
    (``gpu_used_gib``: every process on it, colocated groups together) and the sum of the
    workers' own peak allocations (``gpu_peak_allocated_gib``)."""
    import ray

    stats = [s for g in groups.values() for s in ray.get(g.call("gpu_memory")) if s]
    if not stats:
        return {}
    return {
        "gpu_used_gib": max(s["device_used_gib"] for s in stats),
        "gpu_peak_allocated_gib": sum(s["peak_allocated_gib"] for s in stats),
    }


def hybrid_engine(config: PPOConfig, groups: dict[str, Any], awake: bool) -> None:
    """Put rollout engines that share the policy's GPUs to sleep while it trains (vLLM level 1:
    weights to CPU memory, KV cache freed) and wake them before the weight sync, as veRL's hybrid
    engine and OpenRLHF's colocate_all do. Engines without sleep mode (vLLM-CPU, HF) stay up."""
    import ray

    colocated = any("rollout" in names for names in config.colocate)
    if colocated and config.rollout.engine.sleep_mode:
        ray.get(groups["rollout"].call("wake_up" if awake else "sleep"))


def experience_calls(
    groups: dict[str, Any], exp: Any, frozen_trunk: bool, old_logprobs: bool = True
) -> dict[str, list]:
    """Start the policy's (unless ``old_logprobs`` is false: :func:`old_logprobs_pass`),
    critic's and reference's part of one chunk's experience, each group over its workers (the
    rewards: :func:`~huatuo_ray.rlmf.rewards.reward_calls`)."""

    def sharded(name: str, method: str) -> list:
        return groups[name].call_shards(method, exp.shards(len(groups[name])))

    calls = {"policy": sharded("policy", "log_probs")} if old_logprobs else {}
    if "critic" in groups:
        calls["critic"] = sharded("critic", "values")
    if not frozen_trunk:
        calls["reference"] = sharded("reference", "log_probs")
    return calls


def fill_experience(exp: Any, results: dict[str, list]) -> None:
    """Put the models' answers (lists over each group's shards) into ``exp``; no critic: values
    of 0 (unused); no policy pass: ``logprobs`` stays None (the training forward's own)."""
    import torch

    if "policy" in results:
        exp.logprobs = torch.cat([lp for lp, _ in results["policy"]])
    if "reference" in results:
        exp.ref_logprobs = torch.cat(results["reference"])
    else:
        exp.ref_logprobs = torch.cat([ref for _, ref in results["policy"]])
    if "critic" in results:
        exp.values = torch.cat(results["critic"])
    else:
        exp.values = torch.zeros_like(exp.ref_logprobs)


# --------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    id: str
    ids: list[int]
    info: dict[str, Any] = field(default_factory=dict)  # prompt text, reference, meta (rewards)

    def answer(self, k: int) -> Prompt:
        """The prompt as asked for its k-th answer of a group (its own sampling seed)."""
        return self if k == 0 else Prompt(f"{self.id}#{k}", self.ids, self.info)

    def seed(self, base: int, iteration: int) -> int:
        from huatuo_ray.inference.generation import prompt_seed

        return prompt_seed(base, f"{iteration}:{self.id}")


class PromptStream:
    """The RL prompts in a seeded order per epoch; ``position`` = (epoch, index) resumes it."""

    def __init__(self, config: PPOConfig, tokenizer: Any):
        from huatuo_ray.dialogue import encode_prompt
        from huatuo_ray.rlmf.rl_prompts import rl_prompts

        self.seed = config.seed
        self.prompts: list[Prompt] = []
        self.rejects: list[dict[str, str]] = []
        records = (d for uri in config.inputs for d in artifacts.read_dialogues(uri))
        for prompt in rl_prompts(records, config.last_turn_only):
            ids = encode_prompt(tokenizer, prompt.turns)
            if len(ids) > config.max_prompt_tokens:
                self.rejects.append(
                    {"id": prompt.id, "reason": f"prompt of {len(ids)} tokens > max_prompt_tokens"}
                )
                continue
            info = {
                "prompt": prompt.turns[-1]["content"],
                "reference": prompt.meta.get("reference", ""),
                "meta": {**prompt.meta, "id": prompt.id, "turns": prompt.turns},
            }
            self.prompts.append(Prompt(prompt.id, ids, info))
        if not self.prompts:
            raise ValueError(f"ppo: no usable prompts in {config.inputs}")
        log.warning("ppo: %d prompts (%d rejected)", len(self.prompts), len(self.rejects))
        self.position = [0, 0]

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[Prompt]:
        batch = []
        epoch, index = self.position
        order = self._order(epoch)
        while len(batch) < size:
            if index == len(order):
                epoch, index = epoch + 1, 0
                order = self._order(epoch)
            batch.append(self.prompts[order[index]])
            index += 1
        self.position = [epoch, index]
        return batch


# --------------------------------------------------------------------------- checkpoints


def _checkpoints(config: PPOConfig) -> str:
    return os.path.join(config.output, "checkpoints")


def save_checkpoint(config: PPOConfig, groups: dict[str, Any], state: dict[str, Any]) -> None:
    """Policy and critic shards, then the driver's state, then ``latest``: a crash at any point
    leaves the previous checkpoint as the newest complete one."""
    import ray

    root = _checkpoints(config)
    folder = os.path.join(root, f"iter_{state['iteration']:06d}")
    ray.get(
        [
            ref
            for name in ("policy", "critic")
            if name in groups
            for ref in groups[name].call("save_checkpoint", os.path.join(folder, name))
        ]
    )
    storage.write_json(os.path.join(folder, "state.json"), state)
    tmp = os.path.join(root, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(os.path.basename(folder))
    os.replace(tmp, os.path.join(root, "latest"))
    kept = sorted(d for d in os.listdir(root) if d.startswith("iter_"))
    for old in kept[: -config.checkpoint.keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    log.warning("ppo: checkpoint %s", folder)


def load_latest_checkpoint(
    config: PPOConfig, groups: dict[str, Any], prompts: PromptStream
) -> dict[str, Any]:
    import ray

    latest = os.path.join(_checkpoints(config), "latest")
    if not os.path.exists(latest):
        return {"iteration": 0, "beta": config.kl.init_beta, "position": [0, 0], "history": [],
                "restarts": []}  # fmt: skip
    with open(latest) as f:
        folder = os.path.join(_checkpoints(config), f.read().strip())
    ray.get(
        [
            ref
            for name in ("policy", "critic")
            if name in groups
            for ref in groups[name].call("load_checkpoint", os.path.join(folder, name))
        ]
    )
    state = storage.read_json(os.path.join(folder, "state.json"))
    state["restarts"].append(state["iteration"])
    prompts.position = list(state["position"])
    log.warning("ppo: resumed from %s (iteration %d)", folder, state["iteration"])
    return state


# --------------------------------------------------------------------------- metrics and output


class PPOMetrics:
    """Per-iteration figures to TensorBoard, the Ray dashboard, the terminal and metrics.jsonl."""

    def __init__(self, config: PPOConfig, started: float | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        self.writer = SummaryWriter(config.tensorboard_dir)
        self.started = started or time.time()  # each record's elapsed_s counts from here
        self.first: int | None = None

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
            if name != "iteration":
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

    def close(self) -> None:
        self.writer.close()


def finish(
    config: PPOConfig,
    groups: dict[str, Any],
    state: dict[str, Any],
    prompts: PromptStream,
    placement: dict[str, list[str]],
    timing: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The final policy as a Hugging Face folder in OUTPUT, the rejects and the manifest
    (``timing``: ``startup_s``, seconds from the stage's start to its first iteration, and
    ``first_iteration_s``)."""
    import ray

    final = os.path.join(config.output, "_final")
    ray.get(groups["policy"].call("save_model", final))
    for name in os.listdir(final):
        os.replace(os.path.join(final, name), os.path.join(config.output, name))
    os.rmdir(final)
    with open(os.path.join(config.output, artifacts.REJECTS), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in prompts.rejects)
    # metrics.jsonl may hold lines of iterations redone after a crash: rewrite it from the state.
    with open(os.path.join(config.output, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in state["history"])
    normalisation = ray.get(groups["reward"].workers[0].normalisation.remote())
    artifacts.write_model_manifest(
        config.output,
        "ppo",
        to_dict(config),
        inputs=[artifacts.input_summary(u) for u in config.inputs],
        head="AutoModelForCausalLM",
        reference=config.reference.mode,
        advantage=config.algorithm.advantage,
        stopped=state.get("stopped"),  # why the run ended before `iterations`, if it did
        teacher_usage={
            n: ray.get(groups[n].workers[0].usage.remote()) for n in teacher_groups(config)
        },
        groups=sorted(groups),  # the actor groups created (no critic: a critic-free run)
        passes=experience_passes(config),  # which model ran which pass each iteration
        reward_normalisation=normalisation,
        weight_sync=placement.pop("weight_sync"),  # the path taken (auto resolved)
        torch_threads=placement.pop("threads"),  # per group, per worker (from the placement)
        **(timing or {}),
        placement=placement,  # node id of each worker, per group
        training={
            "iterations": state["iteration"],
            "final_beta": state["beta"],
            "restarts": state["restarts"],
            "prompts": len(prompts.prompts),
            "rejected_prompts": len(prompts.rejects),
            "first": state["history"][0] if state["history"] else None,
            "last": state["history"][-1] if state["history"] else None,
        },
    )
    return artifacts.read_manifest(config.output)
