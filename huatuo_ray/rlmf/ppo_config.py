"""The ``ppo`` and ``grpo`` stages' configuration: one dataclass per part of the run (``policy``,
``critic``, ``reference``, ``reward``, ``rollout``, ``kl``, ``algorithm``, ``checkpoint``), every
field with its help line, consistency checks in ``__post_init__`` (when the config loads), and the
choices that follow from a config alone (which passes run, which groups exist).

Batch sizes, in rows (one row = one prompt with one sampled answer):

* ``rollout_size`` prompts per iteration, ``sampling.n`` answers each: :attr:`PPOConfig.rows`;
* ``rollout.chunk_size``: rows per generation call (``chunked``) or per piece returned and
  scored (``streamed``); a multiple of the policy workers, and it divides ``rows``;
* ``minibatch_size``: rows per optimizer step over all workers (it divides ``rows``);
* ``micro_batch_size``: rows per forward/backward of one worker (``micro_batch_size`` x workers
  divides ``minibatch_size``), and per forward of the experience passes (reference, critic,
  old log-probs); a worker takes its rows in groups of similar lengths, padding trimmed
  (:meth:`~huatuo_ray.rlmf.experience.Experience.length_groups`): the same gradient, less
  padding computed.

The recipe that runs it: :mod:`~huatuo_ray.rlmf.ppo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from huatuo_ray.config import ClusterConfig, ModelConfig, TeacherConfig, option
from huatuo_ray.inference.generation import EngineConfig, SamplingConfig
from huatuo_ray.rlmf.actors.group import Resources
from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig


def _ppo_optim() -> OptimConfig:
    return OptimConfig(lr=1e-6, warmup_ratio=0.0, min_lr_ratio=1.0)  # the paper: constant 1e-6


@dataclass
class TeacherBudget:
    """Limits of the teacher reward's spending; null: no limit."""

    max_requests: int | None = option(None, help="paid teacher requests over the whole run")
    max_cost_usd: float | None = option(None, help="teacher cost over the whole run (USD)")
    max_requests_per_iteration: int | None = option(None, help="paid requests per iteration")


@dataclass
class TeacherRewardConfig:
    """The ``teacher`` reward kind's settings."""

    teacher: TeacherConfig = option(TeacherConfig(), help="the judging endpoint")
    mode: Literal["pairwise", "versus_doctor"] = option(
        "pairwise", help="pairwise: answers of a group rated in pairs, both orders; "
        "versus_doctor: each answer rated against the doctor's reply"
    )  # fmt: skip
    max_parse_retries: int = option(2, help="asks again when a rating does not parse")
    budget: TeacherBudget = option(TeacherBudget(), help="spending limits that stop the run")


def resolve_method(
    method: str, colocate: list[list[str]], on_gpu: bool, in_process: bool = False
) -> str:
    """The weight-sync path for a PPO config; raises ValueError (one line, with the fix) for a
    layout that cannot work: NCCL between groups sharing a GPU, handles between GPUs, a
    process broadcasting to itself, or a copy in memory between processes. ``in_process``:
    the config's ``colocate_in_process``."""
    colocated = any({"rollout", "policy"} <= set(names) for names in colocate)
    same_process = colocated and in_process
    if method == "auto":
        return "in_process" if same_process else "ipc" if colocated else "broadcast"
    if method == "in_process" and not same_process:
        raise ValueError(
            "weight_sync in_process copies the policy's weights within its own process: put"
            " rollout and policy in one colocate list with colocate_in_process: true, or use"
            " weight_sync: auto"
        )
    if method in ("broadcast", "ipc") and same_process:
        raise ValueError(
            f"weight_sync {method}: rollout and policy share one process (colocate_in_process),"
            " which can neither broadcast to itself nor open its own CUDA IPC handles; use"
            " weight_sync: in_process (or auto)"
        )
    if method == "broadcast" and colocated and on_gpu:
        raise ValueError(
            "weight_sync broadcast: rollout and policy share GPUs (colocate) and NCCL cannot join"
            " two ranks on one GPU; use weight_sync: ipc (or auto)"
        )
    if method == "ipc" and not colocated:
        raise ValueError(
            "weight_sync ipc hands the policy's memory to engines on its own GPUs: put rollout"
            " and policy in one colocate list, or use weight_sync: broadcast (or auto)"
        )
    return method


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
    granularity: Literal["conversation", "turn"] = option(
        "conversation",
        help="consultations, kind function: conversation: one score per consultation, on its "
        "last doctor token; turn: the function scores each doctor turn (the consultation up to "
        "it) and each score goes on that turn's last token (GAE credits the turn; group "
        "estimators use the sum)",
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
class ConsultationConfig:
    """``rollout.mode: consultation``: the policy plays the doctor of whole consultations, the
    teacher plays the patient of each real case (:mod:`~huatuo_ray.rlmf.consultation`)."""

    patient: TeacherConfig = field(
        default_factory=lambda: TeacherConfig(max_tokens=256)
    )  # the endpoint playing the patients (its key from the environment, like every teacher)
    patient_prompt: Literal["consult", "dialogues"] = option(
        "consult",
        help="the patient's brief: consult (the evaluation's patient, who keeps asking: what is "
        "rewarded is what `consult` evaluates) or dialogues (A.2's, who says goodbye when done)",
    )
    max_turns: int = option(4, help="doctor turns at most per consultation")
    max_tokens: int = option(
        2048, help="a consultation whose next doctor turn could pass this many tokens is dropped"
    )
    max_parse_retries: int = option(2, help="asks a patient again when its reply does not parse")
    budget: TeacherBudget = option(TeacherBudget(), help="the patients' spending limits")
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.1))

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError("rollout.consultation.max_turns must be at least 1")


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
    mode: Literal["answer", "consultation"] = option(
        "answer",
        help="answer: one answer to each prompt cut from a dialogue (the paper's RLMF); "
        "consultation: whole consultations on real cases (inputs: `data --source "
        "meddialog_cases`), the policy as the doctor, the teacher as the patient",
    )
    consultation: ConsultationConfig = field(default_factory=ConsultationConfig)


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
    weight_sync: Literal["auto", "broadcast", "ipc", "object_store", "in_process"] = option(
        "auto",
        help="broadcast: NCCL/gloo group (engines on other GPUs or nodes); ipc: handles to the "
        "policy's own memory for engines colocated with it (CUDA IPC; CPU: the object store); "
        "object_store: through Ray's object store; in_process: a copy in memory, for engines in "
        "the policy's process (colocate_in_process); auto: in_process, else ipc when rollout is "
        "colocated with policy, else broadcast",
    )
    sync_bucket_mb: float = option(
        256.0, help="broadcast sync: MiB per bucket (the most an engine holds of an update)"
    )
    iterations: int = option(100, help="PPO iterations (rollout + update)")
    rollout_size: int = option(
        64, help="prompts per iteration (paper: 64); rows = rollout_size x sampling.n"
    )
    minibatch_size: int = option(8, help="rows per optimizer step over all workers")
    micro_batch_size: int = option(
        4, help="rows per forward/backward per worker (rows of similar lengths together)"
    )
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
    colocate_in_process: bool = option(
        False,
        help="the groups of each colocate list share one process per worker instead of one "
        "process each (veRL's hybrid worker): one torch import and one CUDA context, and a "
        "rollout engine beside the policy takes its weights by a copy in memory. Fewer processes "
        "start faster on few CPUs; the groups of a list then take turns. Not for policy with "
        "critic (each holds its own torch.distributed world) nor for vLLM engines",
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
            if source.granularity == "turn" and (
                source.kind != "function" or self.rollout.mode != "consultation"
            ):
                raise ValueError(
                    f"reward source {i}: granularity turn scores a consultation's doctor turns:"
                    " kind function with rollout.mode consultation"
                )
            pairwise = source.kind == "teacher" and source.teacher.mode == "pairwise"
            if pairwise and self.sampling.n < 2:
                raise ValueError(
                    f"reward source {i}: pairwise teacher rewards compare the answers of a group:"
                    " sampling.n >= 2 (a critic-free estimator), or teacher.mode versus_doctor"
                )
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
        if self.colocate_in_process:
            for names in self.colocate:
                names = [n for n in names if n != "critic" or self.algorithm.uses_critic]
                if len(names) < 2:
                    continue  # nothing to share a process with
                if {"policy", "critic"} <= set(names):
                    raise ValueError(
                        "colocate_in_process: policy and critic cannot share a process (each"
                        " holds its own torch.distributed world); put them in separate lists"
                    )
                if "rollout" in names and rollout.engine.backend != "hf":
                    raise ValueError(
                        "colocate_in_process: the engine in a shared process is the HF one"
                        " (vLLM keeps its own process); set rollout.engine.backend: hf, or take"
                        " rollout out of the colocate list"
                    )
                if "reward" in names and self.reward.kind == "teacher":
                    raise ValueError(
                        "colocate_in_process: the teacher reward is an async actor of its own"
                        " (its client waits on the teacher); take reward out of the colocate list"
                    )
        on_gpu = rollout.resources.num_gpus > 0 and self.policy.resources.num_gpus > 0
        resolve_method(  # refuses what cannot work
            self.weight_sync, self.colocate, on_gpu, self.colocate_in_process
        )
        if self.reference.mode == "frozen_trunk" and not frozen_trunk_possible(self):
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


@dataclass
class GRPOConfig(PPOConfig):
    """The ``ppo`` recipe with critic-free defaults (the ``grpo`` stage): GRPO advantages over
    4 answers per prompt, KL (k3) in the loss; any other estimator by ``algorithm.advantage``."""

    algorithm: AlgorithmConfig = field(default_factory=lambda: AlgorithmConfig(advantage="grpo"))
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(n=4, temperature=1.0, top_p=1.0)
    )
    kl: KLConfig = field(default_factory=lambda: KLConfig(placement="loss", estimator="k3"))


# --------------------------------------------------------------------------- what a config implies


def stage_name(config: PPOConfig) -> str:
    """The stage the config is for (``grpo`` or ``ppo``): the label of the run's gauges."""
    return "grpo" if isinstance(config, GRPOConfig) else "ppo"


def reward_group_names(config: PPOConfig) -> list[str]:
    """``reward``, ``reward_1``, ...: one actor group per reward source."""
    return ["reward"] + [f"reward_{i}" for i in range(1, len(config.reward_sources))]


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
    """The groups that pay the teacher (budgets, usage in the manifest): reward groups whose
    source is the teacher, and the patients of consultation rollouts."""
    names = zip(reward_group_names(config), config.reward_sources)
    raters = [name for name, source in names if source.kind == "teacher"]
    return raters + (["patient"] if config.rollout.mode == "consultation" else [])


def frozen_trunk_possible(config: PPOConfig) -> bool:
    layers = config.policy.trainable_layers
    return layers is not None and layers >= 1 and config.policy.deepspeed.zero_stage < 3


def resolve_reference(config: PPOConfig, tied_embeddings: bool) -> str:
    """``auto`` -> frozen_trunk when only top layers train under ZeRO <= 2 and the head is not
    tied to the input embeddings (the trunk would then train); else a separate reference."""
    if config.reference.mode == "frozen_trunk" and tied_embeddings:
        raise ValueError("reference.mode frozen_trunk: the model ties its head to its embeddings")
    if config.reference.mode != "auto":
        return config.reference.mode
    return "frozen_trunk" if frozen_trunk_possible(config) and not tied_embeddings else "separate"
