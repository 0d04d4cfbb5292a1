"""Sequence packing and padding: the shapes a training batch takes.

**Packing** puts several tokenised samples into one row of ``max_length`` tokens. Three things keep
the samples apart, so a packed row trains exactly like its samples run one by one:

* ``position_ids`` restart at 0 at every sample, so rotary positions are the sample's own;
* ``segment_ids`` number the samples of a row (1, 2, ...; 0 is padding), and
  :func:`block_causal_mask` turns them into a 4-D attention mask in which a token sees only the
  earlier tokens of its own sample (block-diagonal causal). With FlashAttention-2, transformers
  separates samples from ``position_ids`` alone, and the mask is not needed;
* labels: each sample starts with its masked prompt, so the shifted loss never asks a sample's
  last token to predict the next sample's first.

**Padding** (packing off) groups samples of similar length (sorted within a window) into
micro-batches and pads each to its longest sample.

All functions here are plain Python/NumPy/torch over lists of samples: a sample is a dict with
``input_ids`` and ``labels`` (lists of ints of equal length).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from huatuo_ray.dialogue import IGNORE_INDEX


def pack(samples: list[dict[str, list[int]]], max_length: int, pad_id: int) -> list[dict[str, Any]]:
    """First-fit-decreasing packing of ``samples`` into rows of exactly ``max_length`` tokens.

    A sample longer than ``max_length`` must have been truncated before (the tokeniser does).
    """
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(samples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"sample of {n} tokens is longer than max_length={max_length}")
        for b, free in enumerate(space):
            if free >= n:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(max_length - n)
    rows = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        segments: list[int] = []
        for seg, i in enumerate(members, start=1):
            n = len(samples[i]["input_ids"])
            ids += samples[i]["input_ids"]
            labels += samples[i]["labels"]
            positions += list(range(n))
            segments += [seg] * n
        pad = max_length - len(ids)
        rows.append(
            {
                "input_ids": ids + [pad_id] * pad,
                "labels": labels + [IGNORE_INDEX] * pad,
                "position_ids": positions + [0] * pad,
                "segment_ids": segments + [0] * pad,
            }
        )
    return rows


def block_causal_mask(segment_ids: Any, dtype: Any) -> Any:
    """(B, L) segment ids -> (B, 1, L, L) additive mask: 0 where a token may attend, else -inf.

    A token attends to earlier tokens of its own segment; a padding token (segment 0) attends
    only to itself, which keeps softmax finite (its output is never used: its label is -100).
    """
    import torch

    seg = segment_ids
    length = seg.shape[-1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=seg.device))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    allowed = (same & causal) | torch.eye(length, dtype=torch.bool, device=seg.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def group_by_length(samples: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """Samples sorted by length, so consecutive micro-batches need little padding."""
    return sorted(samples, key=lambda s: len(s["input_ids"]))


def pad_batch(samples: list[dict[str, Any]], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad variable-length samples to the longest one; attention_mask marks real tokens."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = np.full((len(samples), longest), pad_id, dtype=np.int64)
    labels = np.full((len(samples), longest), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((len(samples), longest), dtype=np.int64)
    for r, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[r, :n], labels[r, :n], attention[r, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def efficiency(batch: dict[str, Any], pad_id: int | None = None) -> tuple[int, int]:
    """(real tokens, total tokens) of a collated batch: the packing or padding efficiency."""
    if "segment_ids" in batch:
        real = int((np.asarray(batch["segment_ids"]) > 0).sum())
    else:
        real = int(np.asarray(batch["attention_mask"]).sum())
    return real, int(np.asarray(batch["input_ids"]).size)
