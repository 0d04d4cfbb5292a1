"""A consultation as one RL sample (issue 24's first part): the training chat template's tokens,
the doctor's the only actions, and the RL math across the patient's turns, by hand."""

from __future__ import annotations

import pytest
import torch

from huatuo_ray.dialogue import (
    ASSISTANT_TAG,
    IGNORE_INDEX,
    USER_TAG,
    encode_text,
    tokenize_dialogue,
    turn,
)
from huatuo_ray.rlmf.advantages import discounted_returns
from huatuo_ray.rlmf.consultation import Transcript
from huatuo_ray.rlmf.experience import make_experience
from huatuo_ray.rlmf.ppo_math import gae, token_rewards

CONSULTATION = [
    turn("system", "你是一名医生。"),
    turn("user", "我头痛三天了。"),
    turn("assistant", "疼在哪里？"),
    turn("user", "额头，一跳一跳的。"),
    turn("assistant", "多休息，如加重请就医。"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_a_three_turn_consultation_is_the_training_templates_tokens_with_doctor_only_actions(
    tokenizer,
) -> None:
    t = Transcript.from_turns(tokenizer, CONSULTATION)
    eos = tokenizer.eos_token_id
    doctor = [encode_text(tokenizer, "疼在哪里？") + [eos],
              encode_text(tokenizer, "多休息，如加重请就医。") + [eos]]  # fmt: skip
    patient = encode_text(tokenizer, f"{USER_TAG}额头，一跳一跳的。 ") + encode_text(
        tokenizer, ASSISTANT_TAG
    )
    # The masked token count is exact: the doctor's two turns with their EOS, nothing else.
    assert t.doctor_tokens == len(doctor[0]) + len(doctor[1]) and t.doctor_turns == 2
    assert t.response == doctor[0] + patient + doctor[1]
    assert t.actions == [1] * len(doctor[0]) + [0] * len(patient) + [1] * len(doctor[1])
    # The same tokens as SFT trains on, and the actions exactly SFT's supervised positions.
    sft = tokenize_dialogue(tokenizer, CONSULTATION, max_length=4096)
    assert t.prompt + t.response == sft.input_ids
    supervised = [int(label != IGNORE_INDEX) for label in sft.labels]
    assert supervised == [0] * len(t.prompt) + t.actions
    # Built turn by turn, as a rollout does, it is the same sample; the engine's next prompt is
    # the whole consultation, ending in the assistant tag.
    live = Transcript.open(tokenizer, CONSULTATION[:2])
    live.add_doctor(doctor[0])
    live.add_patient(tokenizer, "额头，一跳一跳的。")
    assert live.next_prompt()[-len(encode_text(tokenizer, ASSISTANT_TAG)) :] == encode_text(
        tokenizer, ASSISTANT_TAG
    )
    live.add_doctor(doctor[1])
    assert (live.prompt, live.response, live.actions) == (t.prompt, t.response, t.actions)

    exp = make_experience([t.prompt], [t.response], [True], 0, action_masks=[t.actions])
    assert int(exp.action_mask.sum()) == t.doctor_tokens
    assert int(exp.attention_mask[:, exp.prompt_width :].sum()) == len(t.response)
    with pytest.raises(ValueError, match="action flags"):
        make_experience([t.prompt], [t.response], [True], 0, action_masks=[t.actions[:-1]])


# Doctor, doctor, patient, patient, doctor, then padding: the next action after t=1 is t=4.
GAPPED = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])


def test_rewards_returns_and_gae_skip_the_patients_turns_by_hand() -> None:
    kl = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3, 9.0]])
    rewards = token_rewards(torch.tensor([2.0]), kl, GAPPED, beta=0.5)
    # -beta * KL on the doctor's tokens, the score on the last doctor token (t=4).
    assert rewards.tolist()[0] == pytest.approx([-0.05, -0.1, 0.0, 0.0, -0.15 + 2.0, 0.0])
    # A row ending in a patient's turn: the score still goes on the doctor's last token.
    ended_by_patient = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    late = token_rewards(torch.tensor([1.0]), torch.zeros(1, 6), ended_by_patient, beta=0.0)
    assert late.tolist()[0] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]

    r = torch.tensor([[1.0, 2.0, 0.0, 0.0, 3.0, 0.0]])
    g = 0.9
    returns = discounted_returns(r, GAPPED, g)
    g4 = 3.0
    g1 = 2.0 + g * g4  # the patient's turn is not a step
    g0 = 1.0 + g * g1
    assert returns.tolist()[0] == pytest.approx([g0, g1, 0.0, 0.0, g4, 0.0])

    v = torch.tensor([[0.5, 0.25, 7.0, 7.0, 1.0, 7.0]])  # values under the gap are ignored
    lam = 0.5
    a4 = 3.0 + g * 0.0 - 1.0
    a1 = 2.0 + g * 1.0 - 0.25 + g * lam * a4  # bootstraps from t=4, not from t=2
    a0 = 1.0 + g * 0.25 - 0.5 + g * lam * a1
    advantages, value_targets = gae(r, v, GAPPED, g, lam)
    assert advantages.tolist()[0] == pytest.approx([a0, a1, 0.0, 0.0, a4, 0.0])
    assert value_targets.tolist()[0] == pytest.approx(
        [a0 + 0.5, a1 + 0.25, 0.0, 0.0, a4 + 1.0, 0.0]
    )
