"""Packing, the block-causal mask, and the LR schedule, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from huatuo_ray.dialogue import IGNORE_INDEX
from huatuo_ray.train.deepspeed_setup import gradient_accumulation, warmup_cosine
from huatuo_ray.train.packing import block_causal_mask, efficiency, pack, pad_batch


def sample(n: int, start: int) -> dict[str, list[int]]:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}


def test_first_fit_decreasing() -> None:
    samples = [sample(3, 10), sample(6, 20), sample(2, 30), sample(4, 40)]
    rows = pack(samples, max_length=8, pad_id=0)
    # Decreasing: 6 -> row 0; 4 -> row 1; 3 -> row 1 (4+3=7); 2 -> row 0 (6+2=8).
    assert [r["input_ids"] for r in rows] == [
        [20, 21, 22, 23, 24, 25, 30, 31],
        [40, 41, 42, 43, 10, 11, 12, 0],
    ]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert rows[1]["segment_ids"] == [1, 1, 1, 1, 2, 2, 2, 0]
    assert rows[1]["labels"] == [IGNORE_INDEX, 41, 42, 43, IGNORE_INDEX, 11, 12, IGNORE_INDEX]
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    assert efficiency(batch) == (15, 16)
    with pytest.raises(ValueError, match="longer than max_length"):
        pack([sample(9, 0)], max_length=8, pad_id=0)


def test_block_causal_mask_exact() -> None:
    mask = block_causal_mask(torch.tensor([[1, 1, 2, 2, 2, 0]]), torch.float32)[0, 0]
    allowed = (mask == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself
    ]


def test_packed_row_equals_samples_run_alone(tiny_model_dir: str) -> None:
    """No token attends across a sample boundary: logits of a packed row equal the samples' own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(0)
    samples = [
        {"input_ids": torch.randint(5, 1900, (n,), generator=gen).tolist()} for n in (9, 5, 12)
    ]
    for s in samples:
        s["labels"] = list(s["input_ids"])
    rows = pack(samples, max_length=32, pad_id=2)
    assert len(rows) == 1
    row = {k: torch.tensor([v]) for k, v in rows[0].items()}
    with torch.no_grad():
        packed = model(
            input_ids=row["input_ids"],
            position_ids=row["position_ids"],
            attention_mask=block_causal_mask(row["segment_ids"], torch.float32),
        ).logits[0]
        start = 0
        for s in sorted(samples, key=lambda s: -len(s["input_ids"])):  # the packing order
            n = len(s["input_ids"])
            alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            assert torch.allclose(packed[start : start + n], alone, atol=1e-5)
            start += n
        # Without the mask the second sample would see the first: the test can fail.
        leaky = model(input_ids=row["input_ids"]).logits[0]
        assert not torch.allclose(leaky[12:21], packed[12:21], atol=1e-3)


def test_pad_batch() -> None:
    out = pad_batch([sample(2, 5), sample(4, 7)], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 0, 0], [7, 8, 9, 10]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert out["labels"][0].tolist() == [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX]
    assert efficiency(out) == (6, 8)


def test_warmup_cosine_by_hand() -> None:
    # 100 steps, 10 warm-up: linear to 1, then cosine from 1 down to 0.1.
    assert warmup_cosine(0, 100, 0.1, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 0.1, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 0.1, 0.1) == pytest.approx(1.0)
    midway = 10 + 45  # half of the 90 cosine steps
    assert warmup_cosine(midway, 100, 0.1, 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert warmup_cosine(100, 100, 0.1, 0.1) == pytest.approx(0.1)


def test_gradient_accumulation() -> None:
    assert gradient_accumulation(128, 4, 8) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        gradient_accumulation(128, 3, 8)


def test_tokenizer_is_cached_per_folder_until_the_folder_is_rewritten(tiny_model_dir: str) -> None:
    """Ray Data's tokenising tasks reuse a worker's loaded tokenizer; a folder written again
    (a stage rerun into it) is read afresh."""
    import os
    import shutil

    from huatuo_ray.train.data import cached_tokenizer

    folder = shutil.copytree(tiny_model_dir, os.path.join(os.path.dirname(tiny_model_dir), "copy"))
    first = cached_tokenizer(folder)
    assert cached_tokenizer(folder) is first
    assert cached_tokenizer(tiny_model_dir) is not first  # another folder, its own tokenizer
    config = os.path.join(folder, "tokenizer_config.json")
    os.utime(config, ns=(0, os.stat(config).st_mtime_ns + 1_000_000))
    again = cached_tokenizer(folder)
    assert again is not first and cached_tokenizer(folder) is again
