"""Stage ``ppo``: RLMF's last step, PPO against the reward model with a KL penalty to the SFT model.

    python -m huatuo_ray ppo --config jobs/tiny/ppo.yaml

The driver (this file, no GPU) places the actor groups (:mod:`~huatuo_ray.rlmf.ppo_placement`,
:mod:`~huatuo_ray.rlmf.actors`) and runs one iteration after another; its configuration, one
section per group, is :mod:`~huatuo_ray.rlmf.ppo_config`:

1. **rollout**: ``rollout_size`` prompts (the paper: 64; from
   :class:`~huatuo_ray.rlmf.rl_prompts.PromptStream`) go to the rollout engines on the
   ``rollout.schedule`` (:mod:`~huatuo_ray.rlmf.rollout_schedule`): ``streamed`` (default) hands
   each engine its whole share at once and takes finished prompts back in pieces of
   ``rollout.chunk_size``; ``chunked`` (the paper's) sends chunks of 8, one call each; each engine
   samples one response per prompt. With ``rollout.mode: consultation`` the prompts are real
   cases and each row is a whole consultation, the engines the doctor and the ``patient`` group
   the teacher as the patient (:mod:`~huatuo_ray.rlmf.consultation`);
2. **experience**: for each piece, started as soon as it arrives, the policy's log-probs of the
   sampled tokens (plus the reference's, from its frozen trunk or a separate reference group), the
   critic's values and the reward model's normalised score; the driver then puts the rows back in
   prompt order and computes the per-token KL, r = r_RM - beta * KL, GAE advantages and returns
   (:mod:`~huatuo_ray.rlmf.ppo_math`). The policy's pass is left out when it is redundant
   (:func:`~huatuo_ray.rlmf.ppo_config.old_logprobs_pass`: one optimizer step per rollout, a
   separate reference, no KL in the rewards); the training forward then supplies the old
   log-probs and the KL figures, and the manifest's ``passes`` says which passes ran;
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
into the policy loss, with the controller's beta of the iteration (passed to ``train``). The
score is the weighted sum of the reward sources (``reward`` and ``extra_rewards``: the reward
model, the teacher, a Python function; :mod:`~huatuo_ray.rlmf.rewards`); a teacher source whose
budget is spent stops the run cleanly (``stopped`` in the manifest).

Checkpoints (every ``checkpoint.every_iterations``; :mod:`~huatuo_ray.rlmf.ppo_checkpoint`): policy
and critic DeepSpeed states (weights, optimizer, LR schedule) and the driver's state (iteration,
beta, prompt position, metrics) in ``OUTPUT/checkpoints/iter_N``; ``latest`` names the newest
complete one. Rerunning the same command resumes from it. Every random choice derives from
``seed`` and the iteration (prompt order, sampling seeds, minibatch shuffles), so a resumed run
draws what the original would have drawn.
``OUTPUT`` must be a filesystem path every node sees (a shared mount on a cluster).

Output: the final policy as a Hugging Face folder in ``OUTPUT`` (vLLM loads it), ``metrics.jsonl``
(one line per iteration: :mod:`~huatuo_ray.rlmf.ppo_metrics`) and the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from huatuo_ray import artifacts, storage
from huatuo_ray.config import ModelConfig, to_dict
from huatuo_ray.models.fetch import local_model_path
from huatuo_ray.rlmf.ppo_checkpoint import load_latest_checkpoint, save_checkpoint
from huatuo_ray.rlmf.ppo_config import (
    GRPOConfig,
    PPOConfig,
    experience_passes,
    frozen_trunk_possible,
    old_logprobs_pass,
    resolve_reference,
    reward_group_names,
    teacher_groups,
)
from huatuo_ray.rlmf.ppo_metrics import PPOMetrics, gpu_memory
from huatuo_ray.rlmf.ppo_placement import place_actor_groups
from huatuo_ray.rlmf.rl_prompts import PromptStream

# The stages' entry points. PPOConfig and GRPOConfig live in ppo_config and are re-exported:
# the stage registry (huatuo_ray.stages) finds a stage's config class next to its ``main``.
__all__ = ["GRPOConfig", "PPOConfig", "main"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the recipe


def main(config: PPOConfig) -> dict[str, Any]:
    started = time.time()  # start-up (the manifest's startup_s) counts from here, imports too
    from huatuo_ray.runtime import connect

    if storage.exists(os.path.join(config.output, artifacts.MANIFEST)):
        return artifacts.read_manifest(config.output)  # done is done: no Ray started for it
    connect(config.cluster, "ppo")
    _absolute_paths(config)
    os.makedirs(config.output, exist_ok=True)
    local = local_model_path(config.model.path)  # each actor fetches on its own node
    if config.reference.mode == "frozen_trunk" or (
        config.reference.mode == "auto" and frozen_trunk_possible(config)
    ):  # only then does a tied head matter
        config.reference.mode = resolve_reference(config, tied_embeddings(config.model, local))
    else:
        config.reference.mode = resolve_reference(config, False)
    total_steps = (  # optimizer steps, for the LR schedule
        config.iterations * config.ppo_epochs * (config.rows // config.minibatch_size)
    )
    groups: dict[str, Any] = {}
    try:
        place_actor_groups(config, groups)  # the actors import and load their models meanwhile,
        from transformers import AutoTokenizer  # while this process imports its own part

        tokenizer = AutoTokenizer.from_pretrained(local)
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        prompts = PromptStream(config, tokenizer)
        return run(config, groups, prompts, pad_id, total_steps, started)
    finally:  # also when placing failed half-way
        for group in groups.values():
            group.shutdown()


def tied_embeddings(model: ModelConfig, local: str) -> bool:
    """Whether the model ties its head to its input embeddings: config.json's
    ``tie_word_embeddings`` when it says, else the model class's default (transformers)."""
    try:
        with open(os.path.join(local, "config.json"), encoding="utf-8") as f:
            tied = json.load(f).get("tie_word_embeddings")
    except (OSError, ValueError):
        tied = None
    if isinstance(tied, bool):
        return tied
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(local, trust_remote_code=model.trust_remote_code)
    return bool(getattr(loaded, "tie_word_embeddings", False))


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

    mark("driver_ready")  # groups placed and starting; this process's imports and prompts done
    trained = [name for name in ("policy", "critic") if name in groups]  # no critic: critic-free
    ray.get([ref for name in trained for ref in groups[name].setup_distributed(total_steps)])
    mark("trainers_ready")
    placement = {name: ray.get(group.call("node_id")) for name, group in groups.items()}
    placement["threads"] = {name: ray.get(g.call("torch_threads")) for name, g in groups.items()}
    placement["processes"] = {name: ray.get(g.call("pid")) for name, g in groups.items()}
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
            by = "patient" if counts.get("patient_budget_spent") else "teacher"
            state["stopped"] = f"{by} budget spent"
            log.warning("ppo: %s budget spent at iteration %d: stopping", by, iteration + 1)
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
        if teacher_groups(config):  # patients and raters: requests and cost so far
            figures.update(metrics.teacher_usage(teacher_usage(groups, config)))
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
        return None if exp is None else final_scores(exp, config)

    exp = informative_rollout(config, sample, counts, pad_id)
    if exp is None:  # a teacher budget is spent (counts["budget_spent"])
        return None
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
    ``rollout.schedule`` (or, with ``rollout.mode: consultation``, ``sampling.n`` whole
    consultations per case: :func:`~huatuo_ray.rlmf.consultation.sample_consultations`), with
    the models' log-probs, values (with a critic) and summed reward scores, each piece's calls
    started as it arrives; rows back in prompt order (a group's answers consecutive). None when
    a consultation rollout kept no whole group or its patients' budget is spent."""
    import ray
    import torch

    from huatuo_ray.rlmf import consultation, rewards, rollout_schedule
    from huatuo_ray.rlmf.experience import concat

    started = time.time()
    n = config.sampling.n
    drawn_at = prompts.position  # (epoch, index): unique per draw, and checkpointed
    batch = [p.answer(k) for p in prompts.next_batch(config.rollout_size) for k in range(n)]
    if config.rollout.mode == "consultation":  # a case drawn twice in an iteration (a refill,
        # or an epoch's end) must not replay the same consultations: seeds per draw and row
        seeds = [
            p.seed(config.sampling.seed, iteration, f"{drawn_at[0]}.{drawn_at[1]}.{row}")
            for row, p in enumerate(batch)
        ]
    else:
        seeds = [p.seed(config.sampling.seed, iteration) for p in batch]
    names = reward_group_names(config)
    figures = {} if figures is None else figures
    generation: list[tuple[float, float]] = []  # the engines' spans (answer mode)
    parts, order = [], []
    if config.rollout.mode == "consultation":
        sampled = consultation.sample_consultations(
            config, groups, batch, seeds, prompts.tokenizer, pad_id, counts, figures
        )
        if sampled is None:  # no whole group kept, or the patients' budget is spent
            times["generate_s"] = times.get("generate_s", 0.0) + time.time() - started
            return None
        exp, infos = sampled
        pieces: Any = [(list(range(len(exp))), exp, infos)]
    else:
        pieces = answer_pieces(config, groups, batch, seeds, pad_id, generation)
    for indices, exp, infos in pieces:
        calls = experience_calls(
            groups, exp, config.reference.frozen_trunk, old_logprobs_pass(config)
        )
        calls |= rewards.reward_calls(groups, names, exp, infos)
        parts.append((exp, calls))
        order += indices
    generated = time.time()
    times["generate_s"] = times.get("generate_s", 0.0) + generated - started
    weights = {name: source.weight for name, source in zip(names, config.reward_sources)}
    filled = []
    for exp, calls in parts:
        results = {k: ray.get(v) for k, v in calls.items()}
        fill_experience(exp, results)
        exp.scores, exp.raw_scores, errors, spent, exp.turn_rewards = rewards.combine(
            results, weights
        )
        counts["reward_errors"] = counts.get("reward_errors", 0) + errors
        if spent:
            counts["budget_spent"] = 1
        filled.append(exp)
    exp = concat(filled, pad_id).select(torch.argsort(torch.tensor(order)))
    times["experience_s"] = times.get("experience_s", 0.0) + time.time() - generated
    if config.rollout.mode == "answer":  # after scoring: the scorers' timelines are complete
        figures.update(rollout_schedule.figures(groups, generation))
    return exp


def answer_pieces(
    config: PPOConfig,
    groups: dict[str, Any],
    batch: list[Any],
    seeds: list[int],
    pad_id: int,
    generation: list[tuple[float, float]],
) -> Iterator[tuple[list[int], Any, list[dict[str, Any]]]]:
    """``rollout.mode: answer``: one answer per row of ``batch`` on the schedule
    ``rollout.schedule``, as pieces (row indices, their Experience, their reward infos) in the
    order the engines finish them; ``generation`` gets the engines' spans."""
    from huatuo_ray.rlmf import rollout_schedule
    from huatuo_ray.rlmf.experience import make_experience

    ids = [p.ids for p in batch]
    engines = groups["rollout"].workers
    if config.rollout.schedule == "streamed":
        pieces = rollout_schedule.streamed(
            engines, ids, seeds, config.rollout.chunk_size, config.rollout.balance, generation
        )
    else:
        pieces = rollout_schedule.chunked(
            engines, ids, seeds, config.rollout.chunk_size, generation
        )
    for indices, samples in pieces:
        exp = make_experience(
            [ids[i] for i in indices],
            [o.token_ids for o in samples],
            [o.finished for o in samples],
            pad_id,
            [o.logprobs for o in samples],
        )
        yield indices, exp, [batch[i].info for i in indices]


def final_scores(exp: Any, config: PPOConfig) -> Any:
    """The scores that train (and that dynamic filtering judges): cut responses take
    ``reward.unfinished_score`` when it is set, then scores are clipped to ``reward.clip``."""
    import torch

    before = exp.scores
    if config.reward.unfinished_score is not None:
        penalty = torch.tensor(config.reward.unfinished_score, dtype=exp.scores.dtype)
        exp.scores = torch.where(exp.finished, exp.scores, penalty)
    if config.reward.clip is not None:
        exp.scores = exp.scores.clamp(-config.reward.clip, config.reward.clip)
    if exp.turn_rewards is not None:  # a replaced or clipped score goes whole on the last token
        exp.turn_rewards = exp.turn_rewards * (exp.scores == before).unsqueeze(-1)
    return exp


def add_rewards_and_advantages(exp: Any, beta: float, config: PPOConfig) -> None:
    """KL per token, r = score - beta * KL (score on the last token; turn-level scores on their
    turns' last tokens), GAE advantages and returns,
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
    if exp.turn_rewards is None:
        exp.rewards = ppo_math.token_rewards(exp.scores, exp.kl, mask, reward_beta)
    else:  # turn-level scores on their turns' last tokens, the rest on the last action token
        rest = exp.scores - exp.turn_rewards.sum(-1)
        exp.rewards = ppo_math.token_rewards(rest, exp.kl, mask, reward_beta) + exp.turn_rewards
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
    """Start the policy's (unless ``old_logprobs`` is false:
    :func:`~huatuo_ray.rlmf.ppo_config.old_logprobs_pass`),
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


def teacher_usage(groups: dict[str, Any], config: PPOConfig) -> dict[str, dict[str, Any]]:
    """Each teacher group's client usage (requests paid and cached, tokens, cost)."""
    import ray

    return {n: ray.get(groups[n].workers[0].usage.remote()) for n in teacher_groups(config)}


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


# --------------------------------------------------------------------------- the output


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
        teacher_usage=teacher_usage(groups, config),
        groups=sorted(groups),  # the actor groups created (no critic: a critic-free run)
        passes=experience_passes(config),  # which model ran which pass each iteration
        reward_normalisation=normalisation,
        weight_sync=placement.pop("weight_sync"),  # the path taken (auto resolved)
        torch_threads=placement.pop("threads"),  # per group, per worker (from the placement)
        processes=placement.pop("processes"),  # each worker's pid, per group (shared: the same)
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
