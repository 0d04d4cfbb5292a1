"""What the stages that train on preference pairs share (``reward-model``, ``dpo``): their config
fields, the pairs as token rows on Ray Data, what "better on validation" means, and the model
artifact at the end.

A preference record (from ``score``) holds the prompt turns and the chosen and rejected responses.
Each side is tokenised as the policy will see it: the prompt with the chat template
(:func:`~huatuo_ray.dialogue.encode_prompt`), then the response and EOS. A pair longer than
``max_length`` on either side is rejected with that reason. Records are split into train and
validation by a hash of their prompt, so one prompt never sits on both sides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from huatuo_ray import artifacts
from huatuo_ray.config import option
from huatuo_ray.dialogue import Dialogue, encode_prompt, encode_text
from huatuo_ray.train.data import cached_tokenizer, tokenise
from huatuo_ray.train.loop import TrainStageConfig
from huatuo_ray.train.metrics import timing_summary
from huatuo_ray.train.ray_trainer import promote_best


@dataclass(kw_only=True)
class PairStageConfig(TrainStageConfig):
    """The fields of the stages that train on preference pairs (``reward-model``, ``dpo``)."""

    preferences: str = option(
        help="preference artifact (the score stage's output)", input="artifact", made_by="score"
    )
    validation_fraction: float = option(0.1, help="share of prompts held out for validation")
    max_length: int = option(1024, help="longest prompt + response; longer pairs are rejected")
    micro_batch_size: int = option(4, help="pairs per worker per forward/backward")
    global_batch_size: int = option(32, help="pairs per optimizer step over all workers")
    epochs: int = option(2, help="passes over the training pairs")
    seed: int = option(0, help="seed of initialisation and the split")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in (0, 1)")


PAIR_COLUMNS = ["chosen_ids", "rejected_ids", "margin", "prompt_len"]


def is_validation(prompt_id: str, fraction: float, seed: int = 0) -> bool:
    digest = hashlib.sha256(f"{seed}:split:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def encode_response(tokenizer: Any, turns: list[dict[str, str]], response: str) -> list[int]:
    return (
        encode_prompt(tokenizer, turns)
        + encode_text(tokenizer, response)
        + [tokenizer.eos_token_id]
    )


def tokenize_pairs(batch: Any, tokenizer_path: str, max_length: int) -> Any:
    """Ray Data function: preference rows -> (chosen_ids, rejected_ids, margin) rows + rejects
    (a task on a pooled worker, with that worker's cached tokenizer: :func:`~huatuo_ray.train.data.tokenize_block`)."""
    import pyarrow as pa

    tokenizer = cached_tokenizer(tokenizer_path)
    out = []
    for row in batch.to_pylist():
        record = Dialogue.from_row(row)
        prompt_len = len(encode_prompt(tokenizer, record.turns))
        chosen = encode_response(tokenizer, record.turns, record.meta["chosen"])
        rejected = encode_response(tokenizer, record.turns, record.meta["rejected"])
        reject = ""
        if max(len(chosen), len(rejected)) > max_length:
            reject = json.dumps(
                {"where": record.id, "reason": f"pair longer than max_length={max_length}"}
            )
            chosen = rejected = []
        out.append(
            {
                "chosen_ids": chosen,
                "rejected_ids": rejected,
                "margin": float(record.meta.get("margin", 0.0)),
                "prompt_len": prompt_len,
                "reject": reject,
            }
        )
    return pa.Table.from_pylist(out)


def pair_batches(shard: Any, micro_batch_size: int, pad_id: int, **feed: Any) -> Any:
    """A Ray Train worker's micro-batches of pairs (:func:`collate_pairs`); ``feed``: the
    loop's prefetch options (:attr:`~huatuo_ray.train.loop.TrainRun.feed`)."""
    return shard.iter_torch_batches(
        batch_size=micro_batch_size, collate_fn=lambda b: collate_pairs(b, pad_id), **feed
    )


def collate_pairs(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, Any]:
    """Chosen rows then rejected rows, right-padded to one length: (2B, L) tensors, plus the
    (B,) per-pair columns: margins, prompt lengths, and DPO's reference log-probs when present."""
    import torch

    sides = [list(x) for x in batch["chosen_ids"]] + [list(x) for x in batch["rejected_ids"]]
    longest = max(len(s) for s in sides)
    ids = np.full((len(sides), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sides), longest), dtype=np.int64)
    for r, s in enumerate(sides):
        ids[r, : len(s)], mask[r, : len(s)] = s, 1
    out = {
        "input_ids": torch.as_tensor(ids),
        "attention_mask": torch.as_tensor(mask),
        "margin": torch.as_tensor(np.asarray(batch["margin"], dtype=np.float32)),
    }
    if "prompt_len" in batch:
        out["prompt_len"] = torch.as_tensor(np.asarray(batch["prompt_len"], dtype=np.int64))
    for name in ("ref_chosen", "ref_rejected"):
        if name in batch:
            out[name] = torch.as_tensor(np.asarray(batch[name], dtype=np.float32))
    return out


def prepare_pairs(
    rows: list[dict[str, Any]], tokenizer_path: str, max_length: int, in_driver_below: int = 0
) -> tuple[Any, list[dict]]:
    """Tokenise preference rows; (materialised dataset of pairs, rejects); in the driver when
    there are fewer than ``in_driver_below`` (:func:`~huatuo_ray.train.data.tokenise`)."""
    import pyarrow as pa

    return tokenise(
        pa.Table.from_pylist(rows), tokenize_pairs, (tokenizer_path, max_length), PAIR_COLUMNS,
        256, 1, in_driver=0 < len(rows) < in_driver_below,
    )  # fmt: skip


def prepare_preferences(config: Any) -> dict[str, tuple[Any, list[dict]]]:
    """``config.preferences`` split by prompt (``validation_fraction``, ``seed``) and tokenised:
    ``{"train": (dataset, rejects), "validation": (dataset, rejects)}``."""
    rows = list(artifacts.iter_rows(config.preferences))
    split = split_preferences(rows, config.validation_fraction, config.seed, config.preferences)
    return {
        k: prepare_pairs(v, config.model.path, config.max_length, config.tokenize_in_driver_below)
        for k, v in split.items()
    }


def promote_pair_model(
    config: Any, prepared: dict[str, tuple[Any, list[dict]]], train_pairs: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Move a pair stage's best weights into ``config.output`` and write its rejects; returns the
    loop's final state and the ``training`` section of the model manifest."""
    rejects = prepared["train"][1] + prepared["validation"][1]
    state = promote_best(config.output, rejects)
    best = state["best"]
    training = {
        "steps": state["step"],
        "best": {"step": best["step"], "accuracy": best["val_accuracy"], "loss": best["val_loss"]},
        "validation_history": state["history"],
        "train_loss": state["train_loss"],
        "restarts": state["restarts"],
        "train_pairs": train_pairs,
        "validation_pairs": prepared["validation"][0].count(),
        "rejected_pairs": len(rejects),
        "step_timing": timing_summary(state),
    }
    return state, training


def pair_accuracy_improved(new: dict[str, float], best: dict[str, Any] | None) -> bool:
    """The "better" of the pair stages: higher validation accuracy, then lower validation loss."""
    return (
        best is None
        or new["val_accuracy"] > best["val_accuracy"]
        or (new["val_accuracy"] == best["val_accuracy"] and new["val_loss"] < best["val_loss"])
    )


def split_preferences(
    rows: list[dict[str, Any]], fraction: float, seed: int, where: str
) -> dict[str, list[dict[str, Any]]]:
    """{"train": rows, "validation": rows} split by a hash of each row's prompt id."""
    split: dict[str, list] = {"train": [], "validation": []}
    for row in rows:
        prompt_id = json.loads(row["meta"]).get("prompt_id", row["id"])
        split["validation" if is_validation(prompt_id, fraction, seed) else "train"].append(row)
    if not split["train"] or not split["validation"]:
        raise ValueError(f"{where}: too few preferences for a train/validation split")
    return split
