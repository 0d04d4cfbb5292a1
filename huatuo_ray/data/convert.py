"""Stage ``data``: one public dataset in its original format -> a dataset artifact.

    python -m huatuo_ray data --source cmedqa2 --input path/to/cMedQA2 --output outputs/cmedqa2

Reads with the source's reader, writes every good row as a dialogue record and every bad one to
``rejects.jsonl`` with where and why; nothing is dropped silently and one bad row never stops the
rest. Rerunning on a complete artifact does nothing (use ``overwrite=true`` to redo it); a folder
left without a manifest by a crash is converted again from scratch, which is cheap here.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from huatuo_ray import artifacts, storage
from huatuo_ray.config import ClusterConfig, option, to_dict
from huatuo_ray.data.readers import READERS, SOURCE_HELP
from huatuo_ray.dialogue import Dialogue, RecordError

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Convert one public dataset into a dataset artifact."""

    source: str = option(help="reader name: " + ", ".join(READERS))
    input: str = option(
        help="file or folder in the source's original format (path or URI)", input="file"
    )
    output: str = option(help="artifact folder to write (path or URI)")
    shard_rows: int = option(10_000, help="records per Parquet shard")
    limit: int | None = option(None, help="stop after this many records (None: all)")
    overwrite: bool = option(False, help="redo a complete artifact instead of keeping it")
    cluster: ClusterConfig = option(ClusterConfig(), help="Ray connection")

    def __post_init__(self) -> None:
        if self.source not in READERS:
            raise ValueError(f"source {self.source!r} is not one of: {', '.join(READERS)}")
        if self.shard_rows < 1:
            raise ValueError("shard_rows must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be at least 1 when set")


def convert(config: DataConfig) -> dict:
    """The conversion itself, without Ray: returns the manifest."""
    if _complete(config):
        log.info("%s is already complete; overwrite=true redoes it", config.output)
        return artifacts.read_manifest(config.output)
    if storage.exists(config.output):
        storage.delete(config.output)
    started = time.time()
    writer = artifacts.DatasetWriter(config.output, config.shard_rows)
    seen: set[str] = set()
    per_source: Counter[str] = Counter()
    for item in READERS[config.source](config.input):
        if isinstance(item, Dialogue):
            try:
                item.validate()
            except RecordError as e:
                writer.reject(item.id, str(e), str(item.turns)[:500])
                continue
            if item.id in seen:
                writer.reject(
                    item.id, "duplicate id", item.turns[0]["content"] if item.turns else ""
                )
                continue
            seen.add(item.id)
            writer.write(item)
            per_source[item.source] += 1
            if writer.n_rows % 10_000 == 0:
                log.info(
                    "%s: %d records, %d rejects",
                    config.source,
                    writer.n_rows,
                    sum(writer.rejects.values()),
                )
            if config.limit and writer.n_rows >= config.limit:
                break
        else:
            writer.reject(item.where, item.reason, item.raw)
    manifest = writer.finish(
        "data",
        to_dict(config),
        inputs=[{"uri": config.input, "format": config.source, "help": SOURCE_HELP[config.source]}],
        sources=dict(per_source),
        timings={"convert_seconds": round(time.time() - started, 3)},
    )
    log.info(
        "wrote %s: %d records, %d rejects %s",
        config.output,
        manifest["rows"],
        manifest["rejects"]["count"],
        manifest["rejects"]["by_reason"],
    )
    return manifest


def main(config: DataConfig) -> dict:
    from huatuo_ray.runtime import connect

    if not _complete(config):  # a rerun of a finished step starts no Ray
        connect(config.cluster, "data")
    return convert(config)


def _complete(config: DataConfig) -> bool:
    return not config.overwrite and storage.exists(storage.join(config.output, artifacts.MANIFEST))
