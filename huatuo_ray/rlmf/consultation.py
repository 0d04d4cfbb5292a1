"""A consultation as one RL sample: the opening as the prompt, every later turn as the response,
the doctor's tokens (the policy's) the only actions.

The tokens are the training chat template's (:mod:`~huatuo_ray.dialogue`), segment by segment
as :func:`~huatuo_ray.dialogue.tokenize_dialogue` lays them out for SFT: a doctor turn is the
tokens the policy sampled (its EOS included) after the assistant tag; a patient turn is the
user tag, the text and a space, then the assistant tag that opens the doctor's next turn. So
the policy is scored on exactly the context it will see when serving, and the loss, the KL and
the advantages cover its own tokens only (``action_mask`` 0 on the patient's, which stay in
the sequence as context: :func:`~huatuo_ray.rlmf.experience.make_experience`,
:func:`~huatuo_ray.rlmf.ppo_math.gae` across the gaps).

Consultation rollouts (the policy as the doctor, the teacher as the patient) build one
:class:`Transcript` per consultation, turn by turn; :meth:`Transcript.from_turns` builds one
from a finished dialogue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from huatuo_ray.dialogue import ASSISTANT_TAG, USER_TAG, RecordError, encode_prompt, encode_text


@dataclass
class Transcript:
    """``prompt``: the opening (system and the patient's first words, ending in the assistant
    tag); ``response``: the turns since, with ``actions`` (1: a doctor token) beside them."""

    prompt: list[int]
    response: list[int] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    doctor_turns: int = 0

    @classmethod
    def open(cls, tokenizer: Any, opening: list[dict[str, str]]) -> Transcript:
        """The opening turns (a system turn, then the patient's first words)."""
        return cls(encode_prompt(tokenizer, opening))

    def add_doctor(self, token_ids: list[int]) -> None:
        """The doctor's turn as the policy sampled it (EOS included when it ended)."""
        self.response += token_ids
        self.actions += [1] * len(token_ids)
        self.doctor_turns += 1

    def add_patient(self, tokenizer: Any, text: str) -> None:
        """The patient's reply, and the assistant tag the doctor's next turn starts after."""
        ids = encode_text(tokenizer, f"{USER_TAG}{text} ") + encode_text(tokenizer, ASSISTANT_TAG)
        self.response += ids
        self.actions += [0] * len(ids)

    def next_prompt(self) -> list[int]:
        """What the engine continues for the doctor's next turn: the whole consultation."""
        return self.prompt + self.response

    @property
    def doctor_tokens(self) -> int:
        return sum(self.actions)

    @classmethod
    def from_turns(cls, tokenizer: Any, turns: list[dict[str, str]]) -> Transcript:
        """A finished dialogue (system, then the patient first, then alternating) as a
        transcript, the doctor's turns tokenised as training tokenises them."""
        first = next((i for i, t in enumerate(turns) if t["role"] == "assistant"), None)
        if first is None:
            raise RecordError("a consultation needs a doctor turn")
        transcript = cls.open(tokenizer, turns[:first])
        for t in turns[first:]:
            if t["role"] == "assistant":
                transcript.add_doctor(
                    encode_text(tokenizer, t["content"]) + [tokenizer.eos_token_id]
                )
            elif t["role"] == "user":
                transcript.add_patient(tokenizer, t["content"])
            else:
                raise RecordError(f"unexpected {t['role']!r} turn inside a consultation")
        return transcript
