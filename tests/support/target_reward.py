"""A reward model built by hand for PPO tests: a real LlamaForSequenceClassification whose score
rises with how much of the text looks like one target token.

One decoder layer with zero query and key weights attends uniformly over the prefix; its value
projection reads each token's (normalised) embedding along the target token's direction, and its
output puts the mean of that into residual channel 0, which the score head reads. The embedding
table has unit-scale rows with channel 0 zeroed, so the final RMSNorm leaves that mean nearly
unchanged. The score is about ``scale x mean_t cos(token_t, target)`` over the whole sequence:
highest for the target itself, graded for tokens near it, so a policy gets a dense signal.
"""

from __future__ import annotations

import json
import os


def build_target_token_reward_model(
    output_dir: str, tokenizer_dir: str, target_token_id: int, scale: float = 10.0, seed: int = 0
) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hidden, heads = 64, 2
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=tokenizer.model_max_length
        if tokenizer.model_max_length < 10**6
        else 1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).float()
    with torch.no_grad():
        embed = torch.randn(config.vocab_size, hidden)
        embed[:, 0] = 0
        model.model.embed_tokens.weight.copy_(embed)
        layer = model.model.layers[0]
        attn = layer.self_attn
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        normed = embed[target_token_id] / embed[target_token_id].pow(2).mean().sqrt()
        attn.v_proj.weight.zero_()
        attn.v_proj.weight[0] = normed / normed.norm()  # head 0, channel 0: cos-like reading
        attn.o_proj.weight.zero_()
        attn.o_proj.weight[0, 0] = 1.0  # into residual channel 0
        layer.mlp.down_proj.weight.zero_()
        model.score.weight.zero_()
        model.score.weight[0, 0] = scale
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "manifest.json"), "w") as f:
        json.dump(
            {"kind": "model", "factory": "target_token_reward", "target_token_id": target_token_id,
             "reward_normalisation": {"mean": 0.0, "std": 1.0}},
            f,
        )  # fmt: skip
    return output_dir
