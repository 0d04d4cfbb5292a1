"""What crosses actor boundaries in PPO: a rollout batch laid out once, then filled in by actors.

Layout (one row per sample): the prompt is left-padded to the longest prompt of the batch and the
response right-padded to the longest response, so every response starts at column
``prompt_width`` and response-level tensors are plain ``(batch, response_width)`` slices::

    sequences       <pad> <pad> p0 p1 p2 | r0 r1 r2 </s> <pad>
    attention_mask    0     0   1  1  1  |  1  1  1   1    0
    action_mask                          |  1  1  1   1    0

In a consultation the response holds every turn after the opening, and the action mask is 1 on
the doctor's (the policy's) tokens only: the patient's turns in between are context.

``position_ids`` count real tokens only, so a left-padded prompt sees the positions it would
see alone. Every actor reads the same :class:`Experience`; each adds the fields it owns
(log-probs, values, scores), and the driver adds rewards and advantages with
:mod:`~huatuo_ray.rlmf.ppo_math`. Tensors stay on the CPU between actors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Experience:
    sequences: torch.Tensor  # (B, P + R) token ids
    attention_mask: torch.Tensor  # (B, P + R) 1 on real tokens
    action_mask: torch.Tensor  # (B, R) 1 on response tokens, EOS included
    prompt_width: int  # P: the column where responses start
    finished: torch.Tensor  # (B,) bool: the response ended with EOS
    rollout_logprobs: torch.Tensor | None = None  # (B, R) the engine's, processed (generation)
    logprobs: torch.Tensor | None = None  # (B, R) policy at sampling time ("old")
    ref_logprobs: torch.Tensor | None = None  # (B, R) frozen SFT model
    values: torch.Tensor | None = None  # (B, R) critic at sampling time
    scores: torch.Tensor | None = None  # (B,) normalised reward-model score
    # (B, R) the part of ``scores`` that turn-level sources put on each doctor turn's last
    # token (a consultation's ``granularity: turn``); the rest goes on the last action token
    turn_rewards: torch.Tensor | None = None
    raw_scores: torch.Tensor | None = None  # (B,) the reward model's own score
    kl: torch.Tensor | None = None  # (B, R) per-token KL estimate
    rewards: torch.Tensor | None = None  # (B, R) -beta * KL, plus the score on the last token
    advantages: torch.Tensor | None = None  # (B, R) whitened GAE advantages
    returns: torch.Tensor | None = None  # (B, R) GAE returns (value targets)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width :]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, rows: torch.Tensor | slice) -> Experience:
        """The rows ``rows`` of every tensor field."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name)[rows]
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    def to(self, device: torch.device | str) -> Experience:
        """The same rows with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    def shards(self, n: int) -> list[Experience]:
        """``n`` near-equal contiguous parts, one per data-parallel worker."""
        bounds = torch.linspace(0, len(self), n + 1).round().long().tolist()
        return [self.select(slice(a, b)) for a, b in zip(bounds, bounds[1:])]

    def trimmed(self) -> Experience:
        """The same rows without the columns that are padding in every one of them: prompt
        columns on the left, response columns on the right (at least one response column
        stays). A batch of rows of similar lengths then computes no padding at all."""
        real = self.attention_mask[:, : self.prompt_width].bool().any(0)
        first = int(real.long().argmax()) if bool(real.any()) else self.prompt_width
        used = self.attention_mask[:, self.prompt_width :].bool().any(0).nonzero()
        length = int(used.max()) + 1 if len(used) else 1
        end = self.prompt_width + length
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor) or value.dim() < 2:
                continue
            whole_row = f.name in ("sequences", "attention_mask")
            fields[f.name] = value[:, first:end] if whole_row else value[:, :length]
        return dataclasses.replace(self, prompt_width=self.prompt_width - first, **fields)

    def length_groups(self, size: int) -> list[tuple[torch.Tensor, Experience]]:
        """Parts of ``size`` rows (the last may be smaller), the rows ordered by their real
        tokens so that each part holds rows of similar lengths, each part :meth:`trimmed`;
        with each part its row indices into ``self``. Run part by part, a batch whose prompts
        or responses differ in length computes a fraction of its padding."""
        order = torch.argsort(self.attention_mask.sum(-1), stable=True)
        return [
            (order[i : i + size], self.select(order[i : i + size]).trimmed())
            for i in range(0, len(self), size)
        ]

    def minibatches(self, size: int, generator: torch.Generator) -> list[Experience]:
        """A shuffled split into parts of ``size`` rows (the last may be smaller)."""
        order = torch.randperm(len(self), generator=generator)
        return [self.select(order[i : i + size]) for i in range(0, len(self), size)]


def per_length_group(exp: Experience, size: int, forward: Callable[[Experience], Any]) -> Any:
    """``forward`` (a response-level (rows, R') tensor, or a tuple of them and Nones) run on
    each of :meth:`Experience.length_groups`, put back in ``exp``'s row order at its response
    width: what ``forward(exp)`` gives on the response tokens, without computing its padding
    (0 under padding, which every reader masks)."""
    rows, width = len(exp), exp.action_mask.shape[1]
    merged: list[torch.Tensor | None] = []
    single = False
    for index, part in exp.length_groups(size):
        out = forward(part)
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else tuple(out)
        if not merged:
            merged = [None if o is None else o.new_zeros((rows, width)) for o in outs]
        for whole, o in zip(merged, outs):
            if whole is not None:
                whole[index.to(o.device), : o.shape[1]] = o * part.action_mask.to(o)
    return merged[0] if single else tuple(merged)


def make_experience(
    prompts: list[list[int]],
    responses: list[list[int]],
    finished: list[bool],
    pad_id: int,
    rollout_logprobs: list[list[float]] | None = None,
    action_masks: list[list[int]] | None = None,
) -> Experience:
    """Lay prompts and sampled responses (token ids, EOS included when sampled) out as above.
    ``action_masks`` (one 0/1 per response token): which response tokens the policy chose,
    when not all did (a consultation's patient turns are context:
    :class:`~huatuo_ray.rlmf.consultation.Transcript`); losses, KL and advantages cover those
    only."""
    if not prompts or len(prompts) != len(responses):
        raise ValueError("need one response per prompt, and at least one")
    width = max(len(p) for p in prompts)
    length = max(1, max(len(r) for r in responses))
    rows = len(prompts)
    sequences = torch.full((rows, width + length), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width + length), dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        sequences[i, width - len(prompt) : width] = torch.tensor(prompt)
        attention[i, width - len(prompt) : width] = 1
        if response:
            sequences[i, width : width + len(response)] = torch.tensor(response)
            attention[i, width : width + len(response)] = 1
    engine_logprobs = None
    if rollout_logprobs is not None:
        engine_logprobs = torch.zeros((rows, length))
        for i, lps in enumerate(rollout_logprobs):
            engine_logprobs[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    action = attention[:, width:].clone()
    for i, chosen in enumerate(action_masks or []):
        if len(chosen) != len(responses[i]):
            raise ValueError(f"row {i}: {len(chosen)} action flags for {len(responses[i])} tokens")
        action[i, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return Experience(
        sequences=sequences,
        attention_mask=attention,
        action_mask=action,
        prompt_width=width,
        finished=torch.tensor(finished, dtype=torch.bool),
        rollout_logprobs=engine_logprobs,
    )


def concat(parts: list[Experience], pad_id: int) -> Experience:
    """One Experience from several (e.g. the chunks of a rollout), re-padded to common widths."""
    width = max(p.prompt_width for p in parts)
    length = max(p.action_mask.shape[1] for p in parts)

    def pad(t: torch.Tensor, left: int, right: int, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (left, right), value=value)

    fields: dict[str, list[torch.Tensor]] = {}
    for p in parts:
        left, right = width - p.prompt_width, length - p.action_mask.shape[1]
        for f in dataclasses.fields(Experience):
            value = getattr(p, f.name)
            if not isinstance(value, torch.Tensor):
                continue
            if f.name == "sequences":
                value = pad(value, left, right, pad_id)
            elif f.name == "attention_mask":
                value = pad(value, left, right, 0)
            elif value.dim() == 2:  # response-level
                value = pad(value, 0, right, 0)
            fields.setdefault(f.name, []).append(value)
    missing = [f.name for f in dataclasses.fields(Experience) if f.name != "prompt_width"]
    merged = {k: torch.cat(v) for k, v in fields.items()}
    for name in missing:
        merged.setdefault(name, None)
    return Experience(prompt_width=width, **merged)
