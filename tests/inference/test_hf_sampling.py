"""The HF engine's sampling: each row of a batch draws with its own seeded generator (so a prompt's
samples do not depend on its batch), the drawn distribution is temperature / top-k / top-p by
hand, and a streamed share is decoded in batches bounded by ``hf_max_batch``."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from huatuo_ray.inference.generation import (
    EngineConfig,
    HFGenerator,
    SamplingConfig,
    SeededSampler,
    seeded_uniform,
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


def test_the_seeded_noise_is_uniform_and_a_function_of_seed_step_and_token_only() -> None:
    seeds = torch.tensor([3, 1 << 62, 12345, 7], dtype=torch.long)
    u = seeded_uniform(seeds, step=0, width=50_000)
    assert u.dtype == torch.float32 and bool(((u > 0) & (u < 1)).all())
    # Uniform on (0, 1): mean 1/2, variance 1/12, deciles of a tenth each.
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(u.var()) == pytest.approx(1 / 12, abs=0.002)
    deciles = torch.histc(u, bins=10, min=0.0, max=1.0) / u.numel()
    assert deciles.tolist() == pytest.approx([0.1] * 10, abs=0.005)
    # A row's numbers depend on its seed only: the same in another batch, in another position.
    alone = seeded_uniform(torch.tensor([7]), step=0, width=50_000)
    assert torch.equal(alone[0], u[3])
    # Another step, another seed: other numbers, not correlated.
    later = seeded_uniform(seeds, step=1, width=50_000)
    assert not torch.equal(later, u)
    assert abs(float(torch.corrcoef(torch.stack([u[0], later[0]]))[0, 1])) < 0.02
    assert abs(float(torch.corrcoef(u[:2])[0, 1])) < 0.02


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


def test_the_static_kv_cache_draws_what_the_dynamic_one_draws(tiny_model_dir: str) -> None:
    """``generate``'s static cache (the default: written in place, no copy of the cache per step, each
    prompt prefilled once for its n rows) is an implementation choice only: the same tokens and
    log-probs as the growing dynamic one with every row prefilled; and a long call does not size
    the next, shorter call's cache."""
    prompts = [[5 + (i * 11 + j) % 300 for j in range(3 + 5 * i)] for i in range(4)]
    sampling = SamplingConfig(n=3, max_new_tokens=10, temperature=1.0, top_p=1.0)
    out, calls = {}, {}
    for cache in ("static", "dynamic"):
        engine = HFGenerator(tiny_model_dir, EngineConfig(
            backend="hf", hf_batch_prompts=True, hf_cache=cache, hf_decoder="generate"
        ))  # fmt: skip
        calls[cache] = _record_forwards(engine)
        out[cache] = engine.generate(prompts, sampling, [1, 2, 3, 4], logprobs=True)
    static, dynamic = ([s for r in out[c] for s in r] for c in ("static", "dynamic"))
    assert [s.token_ids for s in static] == [s.token_ids for s in dynamic]
    for a, b in zip(static, dynamic):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # Prompt tokens through the model: static, the 4 prompts once (width 18, less the last
    # token, which starts decoding); dynamic, each of the 12 rows (4 prompts x 3).
    assert calls["static"][0] == (4, 17) and calls["static"][1] == (12, 1)
    assert calls["dynamic"][0] == (12, 18)
    assert len(calls["static"]) == 1 + 10 and len(calls["dynamic"]) == 10

    long_then_short = HFGenerator(
        tiny_model_dir, EngineConfig(backend="hf", hf_batch_prompts=True, hf_decoder="generate")
    )
    long_then_short.generate([list(range(5, 200))], sampling, [9])
    lengths = []
    original = long_then_short.model.forward

    @functools.wraps(original)  # generate reads the forward's signature
    def record(*args, **kwargs):
        lengths.append(kwargs["past_key_values"].get_max_length())
        return original(*args, **kwargs)

    long_then_short.model.forward = record
    long_then_short.generate([[5, 6, 7]], sampling, [9])
    # Sized for this call (its prompt + max_new_tokens), not for the long call's 195 + 10.
    assert set(lengths) == {3 + 10}


def _record_forwards(engine: HFGenerator) -> list[tuple[int, int]]:
    """The (rows, tokens) of every forward of ``engine``'s model from now on."""
    shapes: list[tuple[int, int]] = []
    original = engine.model.forward

    @functools.wraps(original)  # generate reads the forward's signature
    def record(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    engine.model.forward = record
    return shapes
