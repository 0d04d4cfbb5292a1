"""The HF engine's own decoding loop (inference/decode_loop.py) against the model itself: at every
step the next-token distribution the loop computes (left-padded batch, distinct prompts prefilled
once, static cache) is the one the model's plain forward gives over the whole sequence so far,
for Llama and for Qwen2 with grouped-query attention and q/k/v biases; it stops when every row
has ended; models it does not compute are left to ``generate``; and through the engine it draws
what ``generate`` draws."""

from __future__ import annotations

import pytest
import torch

from huatuo_ray.inference.decode_loop import DecodeLoop, supports
from huatuo_ray.inference.generation import EngineConfig, HFGenerator, SamplingConfig, greedy_draw

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128)  # fmt: skip


def tiny(family: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**SHAPE, num_key_value_heads=4)).eval()
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_key_value_heads=2)).eval()
    with torch.no_grad():  # biases start at zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_each_step_is_the_models_own_next_token_distribution(family: str) -> None:
    model = tiny(family)
    prompts = [[3, 17, 29, 4, 8], [3, 9], [3, 17, 29, 4, 8], [5, 6, 7, 8, 9, 10, 11]]
    widths: list[tuple[int, int]] = []
    model.model.embed_tokens.register_forward_hook(lambda m, a, o: widths.append(a[0].shape))
    tokens, logprobs = DecodeLoop(model).sample(
        prompts, n=2, max_new_tokens=6, draw=greedy_draw, eos=None, raw_logprobs=True
    )
    assert tokens.shape == logprobs.shape == (8, 6)  # a prompt's 2 rows together
    # The 3 distinct prompts through the model once (left-padded to 7), then one token per row.
    assert widths == [(3, 7)] + [(8, 1)] * 5
    with torch.no_grad():
        for row in range(8):
            sequence = list(prompts[row // 2])
            for step in range(6):
                logits = model(torch.tensor([sequence])).logits[0, -1].float()
                expected = torch.log_softmax(logits, -1)
                assert int(tokens[row, step]) == int(expected.argmax())
                assert float(logprobs[row, step]) == pytest.approx(float(expected.max()), abs=1e-5)
                sequence.append(int(tokens[row, step]))


def test_it_stops_when_every_row_has_ended_and_ignore_eos_never_draws_it() -> None:
    model, eos = tiny("llama"), 2
    ends_at = {0: 0, 1: 2}  # row -> the step it draws eos

    def scripted(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = len(drawn)
        drawn.append(logits)
        token = torch.tensor([eos if ends_at[r] == step else 7 for r in range(2)])
        return token, torch.zeros(2)

    drawn: list[torch.Tensor] = []
    tokens, _ = DecodeLoop(model).sample([[3, 4], [5]], 1, 10, scripted, eos)
    assert tokens.tolist() == [[eos, 7, 7], [7, 7, eos]]  # row 0 ended first, the call at step 2

    drawn.clear()
    tokens, _ = DecodeLoop(model).sample([[3, 4]], 1, 5, greedy_draw, eos, ignore_eos=True)
    assert tokens.shape == (1, 5) and eos not in tokens.tolist()[0]


def test_models_it_does_not_compute_are_left_to_generate(tiny_model_dir: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    assert supports(tiny("llama")) and supports(tiny("qwen2"))
    assert not supports(MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=16)))
    assert supports(MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None)))
    assert not supports(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4)))
    dynamic = tiny("llama")
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    assert not supports(dynamic)
    engine = HFGenerator(tiny_model_dir, EngineConfig(backend="hf"))
    assert engine.loop is not None
    assert (
        HFGenerator(tiny_model_dir, EngineConfig(backend="hf", hf_decoder="generate")).loop is None
    )


def test_the_engine_draws_with_the_loop_what_generate_draws(tiny_model_dir: str) -> None:
    prompts = [[5 + (i * 11 + j) % 300 for j in range(3 + 5 * i)] for i in range(4)]
    prompts.append(prompts[1])  # a repeated prompt (GRPO's rows): its own seed, its own answers
    sampling = SamplingConfig(n=3, max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50)
    out = {}
    for decoder in ("loop", "generate"):
        engine = HFGenerator(
            tiny_model_dir, EngineConfig(backend="hf", hf_batch_prompts=True, hf_decoder=decoder)
        )
        out[decoder] = [s for r in engine.generate(prompts, sampling, [1, 2, 3, 4, 5], True)
                        for s in r]  # fmt: skip
    assert [s.token_ids for s in out["loop"]] == [s.token_ids for s in out["generate"]]
    assert [s.finished for s in out["loop"]] == [s.finished for s in out["generate"]]
    for a, b in zip(out["loop"], out["generate"]):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert out["loop"][3].token_ids != out["loop"][12].token_ids  # prompt 1 again, other seed
