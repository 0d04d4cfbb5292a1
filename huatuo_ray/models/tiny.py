"""Tiny models for tests and the demo: nothing here is downloaded, everything is built on the spot.

The tokenizer is a byte-level BPE trained in a second on the bundled ``demo_corpus.txt``:
byte-level so that any text round-trips exactly (no ``<unk>``), NFC rather than NFKC so that
Chinese full-width punctuation (``，。？：``) is kept as written. The chat role tags are added
tokens, so the template's segment borders are token borders and ``tokenizer(render(turns))``
gives the same ids as :func:`huatuo_ray.dialogue.encode_prompt` without its BOS. Like Llama, the
tokenizer puts one BOS first when asked for special tokens (``tokenizer(text)``) and none with
``add_special_tokens=False``; chat's segment encoder uses the latter, so a training sample or
prompt starts with exactly one BOS.

The models are LlamaForCausalLM / LlamaForSequenceClassification with random weights, small enough
to train for a few steps on a CPU and shaped so that vLLM accepts them (head_dim >= 32).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from huatuo_ray.dialogue import ASSISTANT_TAG, CHAT_TEMPLATE, USER_TAG

DEMO_CORPUS = Path(__file__).with_name("demo_corpus.txt")
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TAGS = (USER_TAG, ASSISTANT_TAG)


def demo_corpus() -> list[str]:
    """The non-empty lines of the bundled corpus."""
    return [line for line in DEMO_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> Any:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Ids 0-3 are ``<s> </s> <pad> <unk>``; the two role tags take the last ids, so the whole
    vocabulary fits ``vocab_size``. The chat template is attached, so the saved folder renders
    prompts the way :mod:`huatuo_ray.dialogue` tokenises them.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.normalizer = normalizers.NFC()  # NFKC would turn "，" into ","
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ROLE_TAGS),
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    # Not special: they are ordinary prompt text, kept by decode(skip_special_tokens=True).
    backend.add_tokens([AddedToken(tag, normalized=False) for tag in ROLE_TAGS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,  # only with add_special_tokens=True; chat._bos detects it
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than {vocab_size}")
    return tokenizer


@dataclass
class TinyConfig:
    """Shape of a tiny Llama. The defaults give ~0.34M parameters and run anywhere.

    hidden_size: width of the residual stream.
    num_layers: decoder layers.
    num_heads: attention heads (as many key/value heads); hidden_size / num_heads is the head
        dimension, which must be >= 32 because vLLM's CPU attention rejects 16.
    intermediate_size: width of the MLP.
    vocab_size: tokenizer and embedding size.
    max_position_embeddings: longest sequence (also the tokenizer's model_max_length).
    seed: torch seed for the random weights, so two builds are identical.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 2000
    max_position_embeddings: int = 4096  # room for the English judge prompt (appendix D)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.head_dim < 32:
            raise ValueError(f"head_dim {self.head_dim} < 32: vLLM's CPU attention rejects it")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _load_or_train_tokenizer(
    config: TinyConfig, texts: Iterable[str] | None, tokenizer_dir: str | None
) -> Any:
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(demo_corpus() if texts is None else texts, config.vocab_size)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens; TinyConfig.vocab_size is smaller")
    tokenizer.model_max_length = config.max_position_embeddings
    return tokenizer


def _llama_config(config: TinyConfig, tokenizer: Any, **extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
        **extra,
    )


def _save(model: Any, tokenizer: Any, output_dir: str, config: TinyConfig, task: str) -> str:
    """Save weights (safetensors), tokenizer and manifest.json; return the folder."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    manifest = {
        "kind": "model",
        "schema_version": 1,
        "factory": "tiny",
        "task": task,
        "architecture": type(model).__name__,
        "config": asdict(config),
        "param_count": sum(p.numel() for p in model.parameters()),
    }
    with open(os.path.join(output_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, ensure_ascii=False, indent=2, sort_keys=True)
    return output_dir


def build_tiny_causal_lm(
    output_dir: str, config: TinyConfig = TinyConfig(), texts: Iterable[str] | None = None
) -> str:
    """A random-weight LlamaForCausalLM plus its tokenizer, saved as a normal HF folder.

    The tokenizer is trained on ``texts`` (the bundled corpus by default). Special ids are set on
    both the model config and the generation config, so ``generate()`` stops at ``</s>`` and pads
    with ``<pad>`` without warnings.
    """
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = _load_or_train_tokenizer(config, texts, None)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(_llama_config(config, tokenizer)).to(torch.float32)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    return _save(model, tokenizer, output_dir, config, "causal_lm")


def build_tiny_reward_model(
    output_dir: str, config: TinyConfig = TinyConfig(), tokenizer_dir: str | None = None
) -> str:
    """A random-weight LlamaForSequenceClassification with one output: a scalar reward.

    Given ``tokenizer_dir`` (e.g. a policy built by :func:`build_tiny_causal_lm`) it reuses that
    tokenizer, so the reward model reads the policy's token ids; otherwise it trains one.
    ``pad_token_id`` is set because the score is read at the last non-pad token of each row.
    """
    import torch
    from transformers import LlamaForSequenceClassification

    tokenizer = _load_or_train_tokenizer(config, None, tokenizer_dir)
    torch.manual_seed(config.seed)
    llama_config = _llama_config(config, tokenizer, num_labels=1)
    model = LlamaForSequenceClassification(llama_config).to(torch.float32)
    return _save(model, tokenizer, output_dir, config, "reward")
