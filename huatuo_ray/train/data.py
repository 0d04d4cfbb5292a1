"""From a dialogue artifact to training batches, on Ray Data.

The driver builds one Ray Dataset per split: read the artifact's Parquet shards, tokenise with
the chat template and the assistant-only loss mask (:func:`~huatuo_ray.dialogue.tokenize_dialogue`),
then pack or length-sort each block of samples (:mod:`~huatuo_ray.train.packing`); a split of
fewer than ``tokenize_in_driver_below`` records by the same functions in the driver itself
(:func:`tokenise`). It is
materialised once, so every sample's outcome can be counted (a sample left without a supervised
token after truncation is a reject with its reason), and then streamed to the training workers
with ``ray.train.get_dataset_shard``: no worker loads the whole set.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from huatuo_ray import artifacts, storage
from huatuo_ray.dialogue import Dialogue, RecordError, tokenize_dialogue
from huatuo_ray.models.fetch import local_model_path
from huatuo_ray.train.packing import group_by_length, pack, pad_batch

TOKEN_COLUMNS = ["input_ids", "labels", "position_ids", "segment_ids"]


def cached_tokenizer(path: str) -> Any:
    """One tokenizer per worker process and model folder: Ray Data's tasks run on pooled
    workers, so a later block (or the next split, or the next stage on the same cluster) finds
    it loaded. A folder rewritten in place (a stage run again into it) is loaded afresh."""
    local = local_model_path(path)
    folder = Path(local)
    stamp = tuple(
        sorted((f.name, f.stat().st_mtime_ns) for f in folder.glob("*token*") if f.is_file())
    )
    return _load_tokenizer(local, stamp)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(local: str, stamp: tuple) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local)


def tokenize_block(batch: Any, tokenizer_path: str, max_length: int, packing: bool) -> Any:
    """Ray Data function: dialogue rows -> packed rows (or length-sorted samples) + rejects.

    A task, not an actor pool: an actor is a new process (seconds of imports) per split, while
    tasks reuse the cluster's idle workers and their cached tokenizer."""
    import pyarrow as pa

    tokenizer = cached_tokenizer(tokenizer_path)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    samples, rejects = [], []
    for row in batch.to_pylist():
        record = Dialogue.from_row(row)
        try:
            t = tokenize_dialogue(tokenizer, record.turns, max_length)
        except RecordError as e:
            rejects.append({"reject": json.dumps({"where": record.id, "reason": str(e)})})
            continue
        samples.append({"input_ids": t.input_ids, "labels": t.labels})
    if packing:
        rows = pack(samples, max_length, pad_id)
    else:
        rows = [
            {
                **s,
                "position_ids": list(range(len(s["input_ids"]))),
                "segment_ids": [1] * len(s["input_ids"]),
            }
            for s in group_by_length(samples)
        ]
    out = [{**r, "reject": ""} for r in rows] + [
        {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": [], **r} for r in rejects
    ]
    return pa.Table.from_pylist(out)


@dataclass
class PreparedSplit:
    dataset: Any  # ray.data.Dataset of token rows, materialised
    rows: int  # packed rows (or samples when packing is off)
    samples: int
    rejects: list[dict[str, str]]


def prepare_split(
    uri: str,
    tokenizer_path: str,
    max_length: int,
    packing: bool,
    workers: int = 1,
    block_samples: int = 512,
    in_driver_below: int = 0,
) -> PreparedSplit:
    """Tokenise (and pack) one dialogue artifact into a materialised Ray Dataset (in the driver
    when it holds fewer than ``in_driver_below`` records: :func:`tokenise`)."""
    manifest = artifacts.read_manifest(uri)
    files = [storage.join(uri, s["file"]) for s in manifest["shards"]]
    if not files:
        raise ValueError(f"{uri} holds no records")
    tokens, rejects = tokenise(
        files, tokenize_block, (tokenizer_path, max_length, packing), TOKEN_COLUMNS,
        block_samples, workers, in_driver=0 < manifest["rows"] < in_driver_below,
    )  # fmt: skip
    return PreparedSplit(tokens, tokens.count(), manifest["rows"] - len(rejects), rejects)


def tokenise(
    source: list[str] | Any,
    fn: Callable[..., Any],
    fn_args: tuple,
    columns: list[str],
    batch_size: int,
    workers: int,
    in_driver: bool,
) -> tuple[Any, list[dict[str, str]]]:
    """``fn`` (pyarrow rows -> token rows and a ``reject`` column) over ``source`` (Parquet files
    or a pyarrow table), ``batch_size`` rows at a time: ``(materialised Ray Dataset of
    columns, rejects)``. On Ray Data tasks (``workers`` at once), or, ``in_driver``, here, for a
    small dataset: the same function on the same batches in milliseconds, where Ray Data's
    first tasks take seconds (a worker process importing transformers and loading the
    tokenizer); the training workers read both alike."""
    import pyarrow as pa
    import ray

    if in_driver:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if isinstance(source, list):
            source = pa.concat_tables(
                [pq.read_table(storage.open_input(f)) for f in source], promote_options="permissive"
            )
        out = pa.concat_tables(
            [fn(source.slice(i, batch_size), *fn_args) for i in range(0, source.num_rows, batch_size)],
            promote_options="permissive",
        )  # fmt: skip
        rejected = pc.not_equal(out["reject"], "")
        rejects = [json.loads(r) for r in out.filter(rejected)["reject"].to_pylist()]
        return ray.data.from_arrow(out.filter(pc.invert(rejected)).select(columns)), rejects
    data = (
        ray.data.read_parquet(source) if isinstance(source, list) else ray.data.from_arrow(source)
    )
    ds = data.map_batches(
        fn,
        fn_args=fn_args,
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=workers,
        # Half a CPU each: on a small cluster the read tasks still find a CPU beside them.
        num_cpus=0.5,
    ).materialize()
    rejects = [json.loads(r["reject"]) for r in ds.filter(lambda r: r["reject"] != "").iter_rows()]
    return ds.filter(lambda r: r["reject"] == "").select_columns(columns).materialize(), rejects


def collate(batch: dict[str, np.ndarray], packing: bool, pad_id: int) -> dict[str, Any]:
    """A micro-batch of rows from Ray Data -> torch tensors for the model (CPU; the loop moves them)."""
    import torch

    if packing:
        return {k: torch.as_tensor(np.stack(batch[k]).astype(np.int64)) for k in TOKEN_COLUMNS}
    samples = [
        {"input_ids": list(i), "labels": list(lab)}
        for i, lab in zip(batch["input_ids"], batch["labels"])
    ]
    return {k: torch.as_tensor(v) for k, v in pad_batch(samples, pad_id).items()}
