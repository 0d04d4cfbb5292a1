"""Sampling from Llama-family models without ``generate``'s per-step Python.

On a small model on CPUs, transformers' ``generate`` spends about half of each decoding step in
Python (logits processors, stopping criteria, cache objects, mask building, output classes);
the matrix products are the other half. This loop runs the same model from its own weights with
about twenty tensor operations per layer and step:

* every **distinct** prompt of a call is prefilled once, left-padded, into one static KV cache of
  ``prompt width + max_new_tokens`` slots, which is then copied to the prompt's rows (GRPO's
  rollouts repeat each prompt once per answer);
* each step feeds every row's last token at its own position (prompt length + step), writes its
  keys and values into the step's slot and attends over the slots filled so far, the prompt's
  left padding masked out;
* the caller's ``draw`` turns each step's logits (float32, over the whole vocabulary) into tokens
  and their log-probs (:class:`~huatuo_ray.inference.generation.SeededSampler` or greedy).

It computes what the Hugging Face model computes (RMSNorm, rotary embeddings as the model's own
``rotary_emb`` holds them, grouped-query attention, SwiGLU), so its logits match the model's
forward up to floating-point order (the tests compare them). Models it does not know, or know
with options it does not implement (sliding windows, dynamic rotary scaling), answer ``False``
to :func:`supports` and are sampled with ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Families laid out as transformers' Llama (q/k/v/o, gate/up/down, input/post-attention RMSNorm).
FAMILIES = ("llama", "qwen2", "mistral")
# Rotary variants whose frequencies do not depend on the sequence's length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")

Draw = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # logits -> tokens, logprobs


def rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = params or {}
    return params.get("rope_type", params.get("type", "default"))


def supports(model: Any) -> bool:
    """Whether this loop computes ``model`` exactly (else ``generate`` samples it)."""
    config = model.config
    return (
        config.model_type in FAMILIES
        and getattr(config, "hidden_act", "silu") == "silu"
        and not getattr(config, "mlp_bias", False)
        and rope_type(config) in STATIC_ROPE
        and not sliding(config)
        and hasattr(model, "model")
        and hasattr(model.model, "rotary_emb")
    )


def sliding(config: Any) -> bool:
    """Whether any layer attends over a sliding window (``layer_types`` where the config has
    them; else Mistral's ``sliding_window``, which Qwen2 switches with ``use_sliding_window``)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return any(t != "full_attention" for t in types)
    return bool(getattr(config, "sliding_window", None)) and getattr(
        config, "use_sliding_window", True
    )


@dataclass
class _Layer:
    """One decoder layer's weights, q/k/v and gate/up concatenated (rebuilt at every call:
    weight sync writes the model's own parameters in place)."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def _bias(*linears: Any) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat(
        [
            lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
            for lin in linears
        ]
    )


class DecodeLoop:
    """Samples continuations of token-id prompts from a Llama-family ``model`` (see module)."""

    def __init__(self, model: Any):
        config = model.config
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps

    def _layers(self) -> list[_Layer]:
        layers = []
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(
                _Layer(
                    attn_norm=layer.input_layernorm.weight,
                    qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    qkv_bias=_bias(attn.q_proj, attn.k_proj, attn.v_proj),
                    out=attn.o_proj.weight,
                    out_bias=attn.o_proj.bias,
                    mlp_norm=layer.post_attention_layernorm.weight,
                    gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    down=mlp.down_proj.weight,
                )
            )
        return layers

    def _rope_tables(self, length: int, device: Any, dtype: Any) -> tuple[torch.Tensor, ...]:
        """cos and signed sin of positions 0..length-1, (length, head_dim): rotating x is
        ``x * cos + x.roll(head_dim // 2, -1) * sin`` (the model's ``rotate_half``, in one op)."""
        rotary = self.model.model.rotary_emb
        positions = torch.arange(length, device=device, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.to(device=device, dtype=torch.float32)
        half = freqs.shape[-1]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * rotary.attention_scaling
        sin = emb.sin() * rotary.attention_scaling
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos.to(dtype), sin.to(dtype)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[list[int]],
        n: int,
        max_new_tokens: int,
        draw: Draw,
        eos: int | None,
        ignore_eos: bool = False,
        raw_logprobs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` continuations of each prompt, rows in prompt order (a prompt's ``n`` together):
        ``(tokens, logprobs)``, each (rows, steps) with steps <= ``max_new_tokens`` (it stops
        when every row has drawn ``eos``; a row's tokens after its ``eos`` are meaningless).
        ``ignore_eos``: ``eos`` is never drawn (its logit is -inf before ``draw``).
        ``raw_logprobs``: log-probs of the logits as the model gives them (before ``ignore_eos``'s
        mask; greedy answers), else the ones ``draw`` returns."""
        model = self.model
        weight = model.lm_head.weight
        device, dtype = weight.device, weight.dtype
        distinct = list(dict.fromkeys(tuple(p) for p in prompts))
        slot_of = {p: i for i, p in enumerate(distinct)}
        rows_of = torch.tensor(
            [slot_of[tuple(p)] for p in prompts for _ in range(n)], device=device
        )
        width = max(len(p) for p in distinct)
        length = width + max_new_tokens
        ids = torch.zeros((len(distinct), width), dtype=torch.long)
        real = torch.zeros((len(distinct), width), dtype=torch.bool)
        for i, p in enumerate(distinct):
            ids[i, width - len(p) :] = torch.tensor(p)
            real[i, width - len(p) :] = True
        ids, real = ids.to(device), real.to(device)
        prompt_len = real.sum(-1)
        cos, sin = self._rope_tables(length, device, dtype)  # the longest prompt is ``width``
        layers = self._layers()

        # Prefill the distinct prompts: causal attention over their real tokens (each position
        # also sees itself, so that a padding row's softmax is never empty: NaN otherwise).
        positions = (real.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
        cache = [
            torch.zeros(
                (2, len(distinct), self.kv_heads, length, self.head_dim), dtype=dtype, device=device
            )
            for _ in layers
        ]
        hidden = model.model.embed_tokens(ids)
        hidden = self._forward(
            hidden, layers, cache, 0, cos[positions], sin[positions], mask[:, None]
        )
        logits = self._logits(hidden[:, -1])[rows_of]

        # Every row its prompt's cache; key slots valid where the prompt was real, then filled.
        cache = [c.index_select(1, rows_of) for c in cache]
        valid = torch.cat(
            [
                real[rows_of],
                torch.ones((len(rows_of), max_new_tokens), dtype=torch.bool, device=device),
            ],
            dim=1,
        )[:, None, None, :]
        position = prompt_len[rows_of]
        finished = torch.zeros(len(rows_of), dtype=torch.bool, device=device)
        tokens, logprobs = [], []
        for step in range(max_new_tokens):
            if step:
                slot = width + step - 1
                hidden = model.model.embed_tokens(tokens[-1][:, None])
                hidden = self._forward(
                    hidden,
                    layers,
                    cache,
                    slot,
                    cos[position][:, None],
                    sin[position][:, None],
                    valid[..., : slot + 1],
                )
                logits = self._logits(hidden[:, -1])
                position = position + 1
            raw = logits
            if ignore_eos and eos is not None:
                logits = logits.clone()
                logits[:, eos] = float("-inf")
            token, logprob = draw(logits)
            if raw_logprobs:
                logprob = torch.log_softmax(raw, -1).gather(-1, token[:, None])[:, 0]
            tokens.append(token)
            logprobs.append(logprob)
            if eos is not None and not ignore_eos:
                finished |= token == eos
                if bool(finished.all()):
                    break
        return torch.stack(tokens, 1), torch.stack(logprobs, 1)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = F.rms_norm(hidden, hidden.shape[-1:], self.model.model.norm.weight, self.eps)
        return F.linear(hidden, self.model.lm_head.weight).float()

    def _forward(
        self,
        hidden: torch.Tensor,
        layers: list[_Layer],
        cache: list[torch.Tensor],
        start: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """``hidden`` (rows, T, hidden) of the tokens at cache slots ``start .. start + T - 1``
        through every layer; their keys and values written into ``cache``; attention over slots
        ``0 .. start + T - 1`` where ``mask`` (rows, 1, T, start + T) allows it."""
        rows, width = hidden.shape[:2]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        end = start + width
        cos, sin = cos[:, None], sin[:, None]  # (rows, 1, T, head_dim): over heads
        for layer, kv in zip(layers, cache):
            h = F.rms_norm(hidden, hidden.shape[-1:], layer.attn_norm, self.eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            qkv = qkv.view(rows, width, heads + 2 * kv_heads, head_dim).transpose(1, 2)
            qk, v = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads :]
            qk = qk * cos + qk.roll(head_dim // 2, -1) * sin
            kv[0, :, :, start:end] = qk[:, heads:]
            kv[1, :, :, start:end] = v
            attn = F.scaled_dot_product_attention(
                qk[:, :heads],
                kv[0, :, :, :end],
                kv[1, :, :, :end],
                attn_mask=mask,
                scale=head_dim**-0.5,
                enable_gqa=heads != kv_heads,
            )
            attn = attn.transpose(1, 2).reshape(rows, width, heads * head_dim)
            hidden = hidden + F.linear(attn, layer.out, layer.out_bias)
            h = F.rms_norm(hidden, hidden.shape[-1:], layer.mlp_norm, self.eps)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, layer.down)
        return hidden
