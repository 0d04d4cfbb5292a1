"""LoRA: only adapters train, and the merged model saves as a plain Hugging Face folder."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from huatuo_ray.train.lora import LoRAConfig, apply_lora


def test_lora_trains_adapters_only_and_merges(tiny_model_dir: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = apply_lora(copy.deepcopy(base), LoRAConfig(enabled=True, r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # One step moves the adapters; the merged weights then differ from the base model's.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, 1900, (2, 16))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(loaded.state_dict()[q], base.state_dict()[q])
    assert not any("lora" in k for k in loaded.state_dict())
