"""Preflight of a base model: does it know any language at all?

A model whose weights are random, or a published *weight delta* (the paper's
``IDEA-CCNL/Ziya-LLaMA-13B-Pretrain-v1`` is one: it must be added to LLaMA-13B before use),
loads without error and trains without complaint, on meaningless weights. Before training, the
stage measures the model's mean next-token loss on a few lines of real Chinese consultation text
(the bundled ``demo_corpus.txt``). A model that predicts nothing has a loss near a uniform guess,
``log(vocabulary size)``; a trained one is far below it (LLaMA-class models: ~0.2-0.4 of it). A
loss above ``max_ratio x log(V)`` stops the run, unless ``allow_untrained`` is set (the tiny
presets, whose models are random by design).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from importlib import resources

log = logging.getLogger(__name__)

#: Loss / log(V) above which a model is taken as untrained (random: ~1.0; a delta: ~1 or more).
MAX_RATIO = 0.75


class UntrainedModelError(RuntimeError):
    """The base model's loss on real text is that of a model that learned nothing."""


@dataclass
class Preflight:
    loss: float  # mean next-token loss (nats) on the probe text
    log_vocab: float  # a uniform guess's loss
    tokens: int

    @property
    def ratio(self) -> float:
        return self.loss / self.log_vocab


def probe_lines(n: int = 8) -> list[str]:
    """The first ``n`` non-empty lines of the bundled consultation text."""
    text = resources.files("huatuo_ray.models").joinpath("demo_corpus.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()][:n]


def measure(model_path: str, lines: list[str] | None = None, max_tokens: int = 128,
            trust_remote_code: bool = False) -> Preflight:  # fmt: skip
    """The model's mean next-token loss on ``lines`` (each cut at ``max_tokens`` tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from huatuo_ray.models.kernels import shape_stable_attention

    shape_stable_attention()  # every probe line is a new shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, trust_remote_code=trust_remote_code
    ).to(device)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in lines or probe_lines():
            ids = tokenizer(line, add_special_tokens=False)["input_ids"][:max_tokens]
            if len(ids) < 2:
                continue
            batch = torch.tensor([ids], device=device)
            loss = model(input_ids=batch, labels=batch).loss.float().item()
            total, count = total + loss * (len(ids) - 1), count + len(ids) - 1
    if not count:
        raise ValueError("preflight: the probe text gave no tokens")
    vocab = model.get_output_embeddings().weight.shape[0]
    del model  # give the GPU back before the training workers start
    if device == "cuda":
        torch.cuda.empty_cache()
    return Preflight(total / count, math.log(vocab), count)


def check_base_model(model_path: str, allow_untrained: bool, trust_remote_code: bool = False,
                     max_ratio: float = MAX_RATIO) -> Preflight | None:  # fmt: skip
    """Measure; raise :class:`UntrainedModelError` when the model looks untrained.
    ``allow_untrained`` skips the check (random tiny models: nothing to learn from it)."""
    if allow_untrained:
        log.warning("preflight of %s skipped (allow_untrained: true)", model_path)
        return None
    result = measure(model_path, trust_remote_code=trust_remote_code)
    summary = (
        f"preflight of {model_path}: loss {result.loss:.2f} nats on {result.tokens} tokens of "
        f"real text; a uniform guess is log(vocab) = {result.log_vocab:.2f}"
    )
    if result.ratio <= max_ratio:
        log.info("%s: trained", summary)
        return result
    raise UntrainedModelError(
        f"{summary}: the weights look untrained, or are a weight delta that must first be "
        "merged into its base (Ziya-LLaMA-13B-Pretrain-v1: see README, 'Merging the Ziya "
        "delta'). Set allow_untrained: true to train anyway."
    )
