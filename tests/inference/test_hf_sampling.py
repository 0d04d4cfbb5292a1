"""The HF engine's sampling: each row of a batch draws with its own seeded generator (so a prompt's
samples do not depend on its batch), the drawn distribution is temperature / top-k / top-p by
hand, and a streamed share is decoded in batches bounded by ``hf_max_batch``."""

from __future__ import annotations

import math

import pytest
import torch

from huatuo_ray.inference.generation import (
    EngineConfig,
    HFGenerator,
    SamplingConfig,
    SeededSampler,
)

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0]])


def _frequencies(sampling: SamplingConfig, draws: int = 20_000) -> list[float]:
    sampler = SeededSampler([7], sampling, "cpu")
    counts = [0] * LOGITS.shape[1]
    for _ in range(draws):
        scores = sampler(None, LOGITS)
        assert (scores == 0).sum() == 1 and torch.isinf(scores).sum() == 3  # one token possible
        counts[int(scores.argmax())] += 1
    return [c / draws for c in counts]


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_the_sampler_draws_temperature_top_k_and_top_p_by_hand() -> None:
    t = 0.7
    expected = _softmax([v / t for v in LOGITS[0].tolist()])
    got = _frequencies(SamplingConfig(n=1, temperature=t, top_p=1.0))
    assert got == pytest.approx(expected, abs=0.015)
    # top-k 2: the two likeliest, renormalised.
    two = _softmax([2.0, 1.0])
    got = _frequencies(SamplingConfig(n=1, temperature=1.0, top_p=1.0, top_k=2))
    assert got == pytest.approx([*two, 0.0, 0.0], abs=0.015)
    # top-p 0.8 at T = 1: p = (0.610, 0.224, 0.136, 0.030); the first alone holds 0.61 < 0.8, the
    # first two 0.83 >= 0.8: those two are kept, renormalised.
    got = _frequencies(SamplingConfig(n=1, temperature=1.0, top_p=0.8))
    assert got == pytest.approx([*two, 0.0, 0.0], abs=0.015)


def test_a_prompts_samples_do_not_depend_on_its_batch(tiny_model_dir: str) -> None:
    engine = HFGenerator(tiny_model_dir, EngineConfig(backend="hf", hf_batch_prompts=True))
    prompts = [[5 + (i * 7 + j) % 300 for j in range(4 + i % 9)] for i in range(6)]
    seeds = [100 + i for i in range(6)]
    sampling = SamplingConfig(n=2, max_new_tokens=12, temperature=0.8, top_p=0.9)
    together = engine.generate(prompts, sampling, seeds)
    alone = [engine.generate([p], sampling, [s])[0] for p, s in zip(prompts, seeds)]
    assert [[x.token_ids for x in r] for r in together] == [[x.token_ids for x in r] for r in alone]
    assert together[0][0].token_ids != together[0][1].token_ids  # a group's answers differ
    again = engine.generate(prompts, sampling, [s + 1 for s in seeds])
    assert [r[0].token_ids for r in again] != [r[0].token_ids for r in together]


def test_a_streamed_share_is_decoded_in_batches_bounded_by_hf_max_batch(
    tiny_model_dir: str,
) -> None:
    prompts = [[5, 6 + i, 7] for i in range(10)]
    sampling = SamplingConfig(n=2, max_new_tokens=4, temperature=1.0, top_p=1.0)
    whole = HFGenerator(tiny_model_dir, EngineConfig(backend="hf", hf_batch_prompts=True))
    pieces = list(whole.stream(prompts, sampling, list(range(10)), piece_size=4))
    assert [[i for i, _ in p] for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert (whole.stats.steps, whole.stats.mean_batch) == (1, 20.0)  # the whole share at once
    bounded = HFGenerator(
        tiny_model_dir, EngineConfig(backend="hf", hf_batch_prompts=True, hf_max_batch=8)
    )
    again = list(bounded.stream(prompts, sampling, list(range(10)), piece_size=4))
    assert (bounded.stats.steps, bounded.stats.in_flight) == (3, 20)  # 4 + 4 + 2 prompts x 2
    flat = [s.token_ids for p in pieces for _, ss in p for s in ss]
    assert flat == [s.token_ids for p in again for _, ss in p for s in ss]
