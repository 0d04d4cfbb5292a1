"""Packed PPO forwards: the rows of an Experience packed into one (restarted positions,
block-causal mask) give the log-probs, the frozen-trunk reference's log-probs and the values
of the padded batch, on the response tokens."""

from __future__ import annotations

import torch

from huatuo_ray.rlmf.experience import make_experience
from huatuo_ray.rlmf.model_ops import (
    FrozenTrunkReference,
    ValueModel,
    forward_logits,
    forward_values,
    pack_rows,
    token_logprobs,
)
from huatuo_ray.train.core import freeze_bottom

PAD = 0


def _experience():
    # Unequal prompts (left-padded) and responses (right-padded), one with a single token.
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    responses = [[20, 21], [22, 23, 24, 25, 26], [27]]
    return make_experience(prompts, responses, [True, False, True], PAD)


def test_pack_rows_lays_rows_end_to_end() -> None:
    exp = _experience()
    packed = pack_rows(exp)
    assert packed.input_ids[0].tolist() == [
        5, 6, 7, 8, 9, 20, 21, 10, 11, 22, 23, 24, 25, 26, 12, 13, 14, 27,
    ]  # fmt: skip
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    assert packed.segment_ids[0].tolist() == [1] * 7 + [2] * 7 + [3] * 4
    # Response token j of row i is predicted at the position before it; padding reads 0.
    assert packed.response_index.tolist() == [[4, 5, 0, 0, 0], [8, 9, 10, 11, 12], [16, 0, 0, 0, 0]]
    assert packed.last_index.tolist() == [6, 13, 17]


def test_packed_forward_equals_padded_log_probs_and_values(tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    exp = _experience()
    mask = exp.action_mask.bool()
    with torch.no_grad():
        padded = token_logprobs(forward_logits(model, exp), exp.responses, 0.7)
        packed = token_logprobs(forward_logits(model, exp, pack=True), exp.responses, 0.7)
    assert torch.allclose(padded[mask], packed[mask], atol=1e-5)

    # The frozen-trunk reference reads the packed forward's captured layer inputs.
    freeze_bottom(model, 1, ["model.norm", "lm_head"])
    reference = FrozenTrunkReference(model, 1)
    with torch.no_grad():
        with reference.capture():
            forward_logits(model, exp)
        width = exp.action_mask.shape[1]
        ref_padded = token_logprobs(reference.logits(keep=width + 1)[:, :-1], exp.responses, 1.0)
        with reference.capture():
            forward_logits(model, exp, pack=True)
        p = pack_rows(exp)
        ref_rows = reference.logits(positions=p.response_index[mask])
    ref_packed = torch.log_softmax(ref_rows, -1).gather(-1, exp.responses[mask][:, None])[:, 0]
    assert torch.allclose(ref_padded[mask], ref_packed, atol=1e-5)

    critic = ValueModel(
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    ).eval()
    with torch.no_grad():
        values = forward_values(critic, exp)
        values_packed = forward_values(critic, exp, pack=True)
    assert torch.allclose(values[mask], values_packed[mask], atol=1e-5)
    assert (values_packed[~mask] == 0).all()
