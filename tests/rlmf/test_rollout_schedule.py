"""The rollout schedule: shares of prompts per engine and the overlap measure by hand; then on a
local Ray with HF engines, the streamed and chunked schedules draw the same samples and scores
for the same seeds, a streamed HF engine decodes its whole share in one batch, and the scoring of
the first pieces starts before the last piece is generated (times from the actors' own clocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from huatuo_ray.config import ClusterConfig, ModelConfig
from huatuo_ray.rlmf import rollout_schedule as rs

TARGET_TOKEN = 100


def test_shares_by_count_are_consecutive_and_by_length_balance_tokens() -> None:
    assert rs.chunks(5, 2) == [[0, 1], [2, 3], [4]]
    assert rs.assign([1] * 8, 2, "count") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rs.assign([1] * 3, 2, "count") == [[0], [1, 2]]
    assert rs.assign([1] * 2, 3, "count") == [[], [0], [1]]
    # Longest first to the lighter engine: 9 -> e0; 5 -> e1; 3 -> e1 (5 < 9); 1 -> e1 (8 < 9).
    assert rs.assign([5, 9, 1, 3], 2, "length") == [[1], [0, 2, 3]]
    with pytest.raises(ValueError):
        rs.assign([1], 1, "tokens")  # type: ignore[arg-type]


def test_overlap_fraction_by_hand() -> None:
    assert rs.union_length([(0, 2), (1, 3), (5, 6)]) == 4
    generation = [(0.0, 10.0), (2.0, 12.0)]  # union: 12 s
    assert rs.overlap_fraction(generation, []) == 0.0
    assert rs.overlap_fraction(generation, [(12.0, 15.0)]) == 0.0  # after: the chunked schedule
    # Scoring during 3-5 and 4-6 (union 3-6) and 11-13 (inside until 12): 3 + 1 of 12 s.
    scoring = [(3.0, 5.0), (4.0, 6.0), (11.0, 13.0)]
    assert rs.overlap_fraction(generation, scoring) == pytest.approx(4 / 12)


@pytest.fixture(scope="module")
def rollout_inputs(tmp_path_factory: pytest.TempPathFactory, shared_datasets, tiny_model_dir):
    from huatuo_ray.data.convert import DataConfig, convert
    from tests.support.target_reward import build_target_token_reward_model

    root = tmp_path_factory.mktemp("schedule")
    csv = shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
    convert(DataConfig(source="cmd_csv", input=str(csv), output=str(root / "prompts"), limit=40))
    reward = build_target_token_reward_model(str(root / "reward"), tiny_model_dir, TARGET_TOKEN)
    return str(root / "prompts"), reward, root


def schedule_config(inputs, model: str, engines: int, **overrides):
    from huatuo_ray.inference.generation import EngineConfig, SamplingConfig
    from huatuo_ray.rlmf.actors.group import Resources
    from huatuo_ray.rlmf.ppo_config import (
        CriticConfig,
        PolicyConfig,
        PPOConfig,
        RewardConfig,
        RolloutConfig,
    )
    from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig

    prompts, reward, root = inputs
    small = Resources(workers=1, num_cpus=0.25)
    ds = DeepSpeedConfig(zero_stage=0, precision="fp32")
    fields = dict(
        inputs=[prompts],
        output=str(Path(root) / "out"),
        model=ModelConfig(path=model),
        reward=RewardConfig(model=ModelConfig(path=reward), resources=small),
        critic=CriticConfig(trainable_layers=None, deepspeed=ds, resources=small),
        policy=PolicyConfig(trainable_layers=1, deepspeed=ds, resources=small),
        rollout=RolloutConfig(
            engine=EngineConfig(backend="hf", hf_batch_prompts=True),
            resources=Resources(workers=engines, num_cpus=0.25),
            chunk_size=4,
        ),
        sampling=SamplingConfig(n=1, max_new_tokens=24, temperature=1.0, top_p=1.0),
        rollout_size=24,
        minibatch_size=8,
        micro_batch_size=8,
        max_prompt_tokens=60,
        cluster=ClusterConfig(address="auto"),
    )
    fields.update(overrides)
    return PPOConfig(**fields)


@pytest.mark.slow
def test_streamed_and_chunked_draw_the_same_samples_and_scoring_overlaps(
    rollout_inputs, tiny_model_dir: str, local_ray
) -> None:
    import ray
    from transformers import AutoTokenizer

    from huatuo_ray.rlmf import ppo, ppo_placement, rl_prompts

    config = schedule_config(rollout_inputs, tiny_model_dir, engines=2)
    ppo._absolute_paths(config)
    config.reference.mode = "frozen_trunk"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = rl_prompts.PromptStream(config, tokenizer)
    groups: dict = {}
    try:
        ppo_placement.place_actor_groups(config, groups)
        ray.get(groups["policy"].setup_distributed(10) + groups["critic"].setup_distributed(10))
        results = {}
        for schedule in ("chunked", "streamed", "streamed"):
            config.rollout.schedule = schedule
            prompts.position = [0, 0]
            times: dict = {}
            figures: dict = {}
            exp = ppo.collect_experience(
                config, groups, prompts, tokenizer.eos_token_id, 3, 0.1, times, figures=figures
            )
            results[schedule] = exp, figures
        chunked, streamed = results["chunked"][0], results["streamed"][0]
        assert len(streamed) == 24
        assert torch.equal(chunked.sequences, streamed.sequences)
        assert torch.equal(chunked.scores, streamed.scores)
        assert torch.equal(chunked.logprobs, streamed.logprobs)
        assert torch.equal(chunked.advantages, streamed.advantages)
        assert results["chunked"][1]["overlap_fraction"] == 0.0
        assert results["chunked"][1]["engine_batch"] == 4.0  # HF: one chunk per call
        # Streamed: each HF engine decodes its whole share (24 prompts / 2 engines) in one batch
        # (its pieces then all leave at the batch's end: the overlap of scoring with generation
        # is shown with a memory-bounded batch in the next test).
        assert results["streamed"][1]["engine_batch"] == 12.0
    finally:
        for group in groups.values():
            group.shutdown()


@pytest.mark.slow
def test_scoring_of_the_first_piece_starts_before_the_last_piece_is_generated(
    rollout_inputs, tiny_model_dir: str, local_ray
) -> None:
    """One engine, six pieces, decoded in batches of at most 4 sequences (``hf_max_batch``, the
    HF engine's memory bound): the reward model's first call (its own clock) starts before the
    engine yields its last piece (the engine's clock)."""
    import ray
    from transformers import AutoTokenizer

    from huatuo_ray.rlmf import ppo, ppo_placement, rl_prompts
    from huatuo_ray.rlmf.experience import make_experience

    config = schedule_config(rollout_inputs, tiny_model_dir, engines=1)
    config.rollout.engine.hf_max_batch = 4
    ppo._absolute_paths(config)
    config.reference.mode = "frozen_trunk"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = rl_prompts.PromptStream(config, tokenizer).next_batch(24)
    groups: dict = {}
    try:
        ppo_placement.place_actor_groups(config, groups)
        # Every group loaded, as the stage has them before its first iteration (the engine warms
        # up while loading, so it may otherwise finish before the reward model has loaded).
        ray.get([ref for group in groups.values() for ref in group.call("node_id")])
        engine, reward = groups["rollout"].workers[0], groups["reward"].workers[0]
        ids, seeds = [p.ids for p in prompts], list(range(24))
        piece_ends, calls = [], []
        for ref in engine.generate_stream.remote(ids, seeds, 4):
            piece = ray.get(ref)
            piece_ends.append(piece["finished"])
            rows = [ids[i] for i in piece["indices"]]
            samples = piece["samples"]
            exp = make_experience(rows, [s.token_ids for s in samples], [True] * 4, 0)
            calls.append(reward.scores.remote(exp))
        ray.get(calls)
        spans = ray.get(reward.timeline.remote())
        assert len(piece_ends) == 6 and len(spans) == 6
        assert spans[0][0] < piece_ends[-1], (spans[0], piece_ends)
    finally:
        for group in groups.values():
            group.shutdown()


@pytest.mark.slow
def test_vllm_cpu_draws_the_same_samples_whole_or_in_chunks(tiny_model_dir: str, local_ray):
    """vLLM-CPU, one engine in a Ray actor: 32 prompts as four calls of 8 (chunked) and as one
    streamed share. Observed on vllm-cpu 0.32 (2-core AVX2): every token and every log-prob the
    same, i.e. its CPU kernels are batch-invariant for this model; asserted as observed."""
    import ray

    from huatuo_ray.inference.generation import EngineConfig, SamplingConfig
    from huatuo_ray.rlmf.actors.rollout import RolloutWorker
    from huatuo_ray.rlmf.rollout_schedule import chunked, streamed

    sampling = SamplingConfig(n=1, max_new_tokens=24, temperature=1.0, top_p=1.0)
    engine = (
        ray.remote(RolloutWorker)
        .options(num_cpus=0.5, runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})
        .remote(tiny_model_dir, EngineConfig(backend="vllm", max_model_len=512), sampling)
    )
    try:
        ids = [[5 + (i * 7 + j) % 300 for j in range(4 + i % 9)] for i in range(32)]
        seeds = [1000 + i for i in range(32)]
        rows: dict[str, list] = {}
        for name, pieces in (
            ("chunked", chunked([engine], ids, seeds, 8)),
            ("streamed", streamed([engine], ids, seeds, 8)),
        ):
            samples: list = [None] * 32
            for indices, piece in pieces:
                for i, sample in zip(indices, piece):
                    samples[i] = sample
            rows[name] = samples
            stats = ray.get(engine.engine_stats.remote())
            # Chunked: at most 8 sequences per step; streamed: all 32 enter the scheduler.
            assert stats["mean_batch"] <= 8 if name == "chunked" else stats["mean_batch"] > 8
        for a, b in zip(rows["chunked"], rows["streamed"]):
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    finally:
        ray.kill(engine)
