"""What PPO's actors do with a Hugging Face model: log-probs and values of an Experience, freezing
the bottom layers, and the frozen-trunk reference (trlx's "hydra").

Freezing (the paper trained only the last two transformer layers; trlx's ``num_layers_unfrozen``):
the embeddings and all but the top ``trainable_layers`` decoder layers are frozen; the top layers
and the modules named in ``trainable_modules`` (by default the final norm and the LM head) train.

Frozen-trunk reference: while only the top N layers train, the bottom layers of the policy *are*
the reference model's bottom layers. :class:`FrozenTrunkReference` keeps a frozen copy of just the
top N layers, the final norm and the head, taken from the SFT weights; one policy forward pass
records the hidden states entering layer L-N, and the copy finishes the reference forward from
there. The reference log-probs then cost N layers instead of a second model, and no second model
sits in memory. It is exact (a test compares it with a separate reference model); it needs an untied head and
ZeRO <= 2, which :func:`~huatuo_ray.rlmf.ppo_config.resolve_reference` checks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from huatuo_ray.rlmf.experience import Experience
from huatuo_ray.train.core import decoder_layers


def disable_dropout(model: nn.Module) -> None:
    """No dropout while training PPO: the old log-probs and values were computed without it, so
    the first step's ratio must be exactly 1 (trlx and OpenRLHF do the same)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


@dataclass
class PackedRows:
    """An Experience's rows without their padding, end to end in one row (as SFT packs):
    positions restart at each row and ``segment_ids`` (1, 2, ...) keep rows apart in the
    block-causal mask. ``response_index[i, j]``: the packed position whose output predicts
    response token j of row i (0 under padding); ``last_index[i]``: row i's last real token."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    segment_ids: torch.Tensor  # (1, T)
    response_index: torch.Tensor  # (B, R)
    last_index: torch.Tensor  # (B,)

    def model_inputs(self, model: Any) -> dict[str, Any]:
        """Keyword arguments for a Hugging Face forward: FlashAttention separates the rows by
        ``position_ids`` alone; other kernels get the 4-D block-causal mask."""
        from huatuo_ray.train.packing import block_causal_mask

        inputs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "use_cache": False,
        }
        inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
        kernel = str(getattr(getattr(inner, "config", None), "_attn_implementation", ""))
        if not kernel.startswith("flash_attention"):
            dtype = next(inner.parameters()).dtype
            inputs["attention_mask"] = block_causal_mask(self.segment_ids, dtype)
        return inputs


def pack_rows(exp: Experience) -> PackedRows:
    real = exp.attention_mask.bool()
    lengths = real.sum(1)
    rows = len(lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    prompt_lengths = real[:, : exp.prompt_width].sum(1)
    width = exp.action_mask.shape[1]
    steps = torch.arange(width, device=lengths.device)
    index = (starts + prompt_lengths - 1)[:, None] + steps[None]
    segments = torch.repeat_interleave(torch.arange(1, rows + 1, device=lengths.device), lengths)
    return PackedRows(
        input_ids=exp.sequences[real][None],
        position_ids=exp.position_ids[real][None],
        segment_ids=segments[None],
        response_index=torch.where(exp.action_mask.bool(), index, torch.zeros_like(index)),
        last_index=starts + lengths - 1,
    )


def unpack_responses(packed_out: torch.Tensor, packed: PackedRows, exp: Experience) -> torch.Tensor:
    """(K, ...) outputs at the real response positions (row-major) -> (B, R, ...), 0 on padding."""
    valid = exp.action_mask.bool()
    full = packed_out.new_zeros((*valid.shape, *packed_out.shape[1:]))
    full[valid] = packed_out
    return full


def forward_logits(model: Any, exp: Experience, pack: bool = False) -> torch.Tensor:
    """Logits predicting each response token: (B, R, vocab). Only those positions go through
    the LM head (the prompt's logits would cost B x P x vocab for nothing). ``pack``: the rows
    run as one packed row (no padding computed); logits under padding are then 0."""
    if pack:
        packed = pack_rows(exp)
        keep = packed.response_index[exp.action_mask.bool()]
        out = model(**packed.model_inputs(model), logits_to_keep=keep)
        return unpack_responses(out.logits[0], packed, exp)
    width = exp.action_mask.shape[1]
    out = model(
        input_ids=exp.sequences,
        attention_mask=exp.attention_mask,
        position_ids=exp.position_ids,
        use_cache=False,
        logits_to_keep=width + 1,
    )
    return out.logits[:, -width - 1 : -1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) under the sampling distribution (logits / temperature): (B, R)."""
    log_p = torch.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    return log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class FrozenTrunkReference:
    """The reference model as: the policy's frozen bottom layers + a frozen copy of the rest.

    ``capture()`` wraps one policy forward pass and records what enters each trainable layer
    (hidden states for the first; masks and rotary embeddings for each, since models may mix
    layer types); ``logits()`` runs the frozen copies of the top layers, the final norm and the
    head on it. Build it before any training step, from pi_0's weights, in the dtype the policy
    runs in.
    """

    def __init__(self, model: nn.Module, trainable_layers: int):
        if trainable_layers < 1:
            raise ValueError("the frozen-trunk reference needs trainable_layers >= 1")
        layers = decoder_layers(model)
        self.first = len(layers) - trainable_layers
        self.layers = [layers[i] for i in range(self.first, len(layers))]
        base = getattr(model, "base_model", model)
        norm_name = next((n for n in ("norm", "final_layernorm", "ln_f") if hasattr(base, n)), None)
        if norm_name is None:
            raise ValueError(
                f"{type(model).__name__}: no final norm found; use reference: separate"
            )
        self.norm = getattr(base, norm_name)
        self.head = model.get_output_embeddings()
        copied = nn.ModuleList([*self.layers, self.norm, self.head])
        # Everything that trains must be inside the copy, and nothing in the copy may be shared
        # with the trunk (a head tied to the input embeddings): else the trunk drifts from pi_0.
        copied_ids = {id(p) for p in copied.parameters()}
        trunk = [p for _, p in model.named_parameters() if id(p) not in copied_ids]
        embeddings = model.get_input_embeddings()
        tied = embeddings is not None and any(
            p is q for p in self.head.parameters() for q in embeddings.parameters()
        )
        if tied or any(p.requires_grad for p in trunk):
            raise ValueError(
                "the frozen-trunk reference needs every trainable weight in the top layers, the"
                " final norm or an untied head; use reference: separate"
            )
        frozen = copy.deepcopy(copied).requires_grad_(False).eval()
        self.frozen_layers = list(frozen)[: len(self.layers)]
        self.frozen_norm, self.frozen_head = frozen[-2], frozen[-1]
        self._captured: list[tuple[tuple, dict] | None] = [None] * len(self.layers)

    def capture(self) -> Any:
        """A context manager recording the inputs of every trainable layer."""
        return _Capture(self)

    @torch.no_grad()
    def logits(
        self, keep: int | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The reference's logits at the captured positions: the last ``keep`` ones, or (a
        packed forward) those at ``positions`` of its one row, as (K, vocab)."""
        if any(c is None for c in self._captured):
            raise RuntimeError("no policy forward pass captured")
        hidden = None
        for layer, (args, kwargs) in zip(self.frozen_layers, self._captured):
            kwargs = dict(kwargs)
            if hidden is None:  # the first trainable layer's input: the shared trunk's output
                hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
            else:
                kwargs.pop("hidden_states", None)
            out = layer(hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        self._captured = [None] * len(self.layers)
        if positions is not None:
            hidden = hidden[0, positions]
        elif keep is not None:
            hidden = hidden[:, -keep:]
        return self.frozen_head(self.frozen_norm(hidden))

    def to(self, device: Any, dtype: torch.dtype | None = None) -> FrozenTrunkReference:
        for m in (*self.frozen_layers, self.frozen_norm, self.frozen_head):
            m.to(device=device, dtype=dtype)
        return self


class _Capture:
    def __init__(self, reference: FrozenTrunkReference):
        self.reference, self.handles = reference, []

    def __enter__(self) -> None:
        for i, layer in enumerate(self.reference.layers):

            def hook(_module: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                self.reference._captured[i] = (args, kwargs)

            self.handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


class ValueModel(nn.Module):
    """A sequence-classification model (the reward model) read at every token: (B, T) values."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # the only submodule: state dicts and checkpoints hold it once

    @property
    def backbone(self) -> nn.Module:
        return self.model.base_model

    @property
    def head(self) -> nn.Module:
        return getattr(self.model, "score", None) or self.model.classifier

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def response_values(values: torch.Tensor, exp: Experience) -> torch.Tensor:
    """V(s_t) for each response token t: read at the position before the token. (B, R)."""
    return values[:, exp.prompt_width - 1 : -1]


def forward_values(model: Any, exp: Experience, pack: bool = False) -> torch.Tensor:
    """A :class:`ValueModel`'s V(s_t) of each response token, (B, R); ``pack`` as in
    :func:`forward_logits` (values under padding are then 0)."""
    if not pack:
        return response_values(model(exp.sequences, exp.attention_mask, exp.position_ids), exp)
    packed = pack_rows(exp)
    inputs = packed.model_inputs(model)
    values = model(inputs["input_ids"], inputs.get("attention_mask"), inputs["position_ids"])
    return unpack_responses(values[0, packed.response_index[exp.action_mask.bool()]], packed, exp)


def last_token_scores(values: torch.Tensor, exp: Experience) -> torch.Tensor:
    """The value at each row's last real token: the sequence score. (B,)."""
    mask = exp.attention_mask.to(values.device)
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    return values[torch.arange(values.shape[0], device=values.device), last]
