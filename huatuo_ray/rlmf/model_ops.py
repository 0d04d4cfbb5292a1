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
sits in memory. It is exact: the test compares it with a separate reference model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from huatuo_ray.rlmf.experience import Experience


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (``model.model.layers`` in Llama/Qwen; found generically)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found")
    return max(lists, key=len)


def freeze_bottom(
    model: nn.Module, trainable_layers: int | None, trainable_modules: list[str]
) -> list[str]:
    """Freeze all but the top ``trainable_layers`` blocks and ``trainable_modules`` (name
    prefixes); None trains everything. Returns the names of the parameters left trainable."""
    if trainable_layers is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    layers = decoder_layers(model)
    if not 0 <= trainable_layers <= len(layers):
        raise ValueError(f"trainable_layers {trainable_layers}: the model has {len(layers)} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    top = list(layers)[len(layers) - trainable_layers :]
    for layer in top:
        for p in layer.parameters():
            p.requires_grad_(True)
    names = dict(model.named_modules())
    for prefix in trainable_modules:
        if prefix not in names:
            raise ValueError(f"trainable_modules: {type(model).__name__} has no module {prefix!r}")
        for p in names[prefix].parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def forward_logits(model: Any, exp: Experience) -> torch.Tensor:
    """Logits predicting each response token: (B, R, vocab)."""
    out = model(
        input_ids=exp.sequences,
        attention_mask=exp.attention_mask,
        position_ids=exp.position_ids,
        use_cache=False,
    )
    return out.logits[:, exp.prompt_width - 1 : -1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) under the sampling distribution (logits / temperature): (B, R)."""
    log_p = torch.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    return log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class FrozenTrunkReference:
    """The reference model as: the policy's frozen bottom layers + a frozen copy of the rest.

    ``capture()`` wraps one policy forward pass and records what enters the first trainable layer;
    ``logits()`` runs the frozen copies of the top layers, the final norm and the head on it.
    """

    def __init__(self, model: nn.Module, trainable_layers: int):
        layers = decoder_layers(model)
        self.first = len(layers) - trainable_layers
        self.layers = [layers[i] for i in range(self.first, len(layers))]
        base = getattr(model, "base_model", model)
        self.norm_name = next(n for n in ("norm", "final_layernorm", "ln_f") if hasattr(base, n))
        self.norm = getattr(base, self.norm_name)
        self.head = model.get_output_embeddings()
        copied = nn.ModuleList([*self.layers, self.norm, self.head])
        frozen = copy.deepcopy(copied).requires_grad_(False).eval()
        self.frozen_layers = list(frozen)[: len(self.layers)]
        self.frozen_norm, self.frozen_head = frozen[-2], frozen[-1]
        # Everything that trains must be inside the copy: otherwise the trunk drifts from pi_0.
        copied_ids = {id(p) for p in copied.parameters()}
        trunk = [p for n, p in model.named_parameters() if id(p) not in copied_ids]
        trainable_trunk = [p for p in trunk if p.requires_grad]
        shared = {id(p) for p in trunk} & {id(p) for p in self.head.parameters()}
        if trainable_trunk or shared:
            raise ValueError(
                "the frozen-trunk reference needs every trainable weight in the top layers, the"
                " final norm or an untied head; use reference: separate"
            )
        self._captured: tuple[tuple, dict] | None = None

    def capture(self) -> Any:
        """A context manager recording the inputs of the first trainable layer."""
        reference = self

        class _Capture:
            def __enter__(self_inner) -> None:
                def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                    reference._captured = (args, kwargs)

                self_inner.handle = reference.layers[0].register_forward_pre_hook(
                    hook, with_kwargs=True
                )

            def __exit__(self_inner, *exc: Any) -> None:
                self_inner.handle.remove()

        return _Capture()

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        if self._captured is None:
            raise RuntimeError("no policy forward pass captured")
        args, kwargs = self._captured
        hidden, rest = args[0], args[1:]
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if "hidden_states" in self._captured[1]:
            hidden = self._captured[1]["hidden_states"]
        for layer in self.frozen_layers:
            out = layer(hidden, *rest, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        self._captured = None
        return self.frozen_head(self.frozen_norm(hidden))

    def to(self, device: Any) -> FrozenTrunkReference:
        for m in (*self.frozen_layers, self.frozen_norm, self.frozen_head):
            m.to(device)
        return self


class ValueModel(nn.Module):
    """A sequence-classification model (the reward model) read at every token: (B, T) values."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.backbone = model.base_model
        self.head = getattr(model, "score", None) or model.classifier

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


def last_token_scores(values: torch.Tensor, exp: Experience) -> torch.Tensor:
    """The value at each row's last real token: the sequence score. (B,)."""
    mask = exp.attention_mask.to(values.device)
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    return values[torch.arange(values.shape[0], device=values.device), last]
