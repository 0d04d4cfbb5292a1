"""Stage ``mixture``: the hybrid SFT set from the four sources (and any other dialogue artifacts).

    python -m huatuo_ray mixture --config jobs/tiny/mixture.yaml

In order, for each source: exact duplicates (same normalised turns) and near duplicates (first
question's ROUGE-L >= ``near_duplicate_threshold`` to one already in) are removed; records whose
question appears in an evaluation artifact (exactly after normalisation, or as a near duplicate)
are removed so that evaluation stays clean; then each source is sampled down to its ``ratio``
(seeded by record id, so the choice is stable). Survivors are split into ``train/`` and
``validation/`` by a hash of their id. Removals go to ``rejects.jsonl`` with the reason; the
manifest counts every record of every source at each step.

Output layout: ``OUT/train`` and ``OUT/validation`` are dataset artifacts; ``OUT/manifest.json``
describes the whole mixture.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from huatuo_ray import artifacts, storage
from huatuo_ray.config import ClusterConfig, option, to_dict
from huatuo_ray.data.similarity import NearDuplicateIndex, normalise
from huatuo_ray.dialogue import Dialogue

log = logging.getLogger(__name__)


@dataclass
class MixtureSource:
    """One input artifact of the mixture."""

    path: str = option(help="dataset artifact", input="artifact")
    ratio: float = option(1.0, help="fraction of this source's (deduplicated) records to take")

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio of {self.path} must be in (0, 1]")


@dataclass
class MixtureConfig:
    """Mix, deduplicate, decontaminate and split the SFT data."""

    output: str = option(help="folder for train/, validation/ and the manifest")
    sources: list[MixtureSource] = option([], help="input artifacts with their ratios")
    eval_sets: list[str] = option(
        [], help="evaluation artifacts whose questions must not be trained on"
    )
    near_duplicate_threshold: float = option(
        0.9, help="ROUGE-L of first questions counted as a duplicate"
    )
    validation_fraction: float = option(0.05, help="share of records held out for validation")
    seed: int = option(0, help="seed of the sampling and the split")
    overwrite: bool = option(False, help="redo a complete mixture")
    shard_rows: int = option(10_000, help="records per Parquet shard")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources must name at least one artifact")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in [0, 1)")


def _unit(seed: int, salt: str, record_id: str) -> float:
    """A stable number in [0, 1) per record: the same choice on every run and machine."""
    digest = hashlib.sha256(f"{seed}:{salt}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _first_question(record: Dialogue) -> str:
    return next((t["content"] for t in record.turns if t["role"] == "user"), "")


def _fingerprint(record: Dialogue) -> str:
    text = "\x1f".join(f"{t['role']}:{normalise(t['content'])}" for t in record.turns)
    return hashlib.sha256(text.encode()).hexdigest()


def mix(config: MixtureConfig) -> dict:
    eval_exact: dict[str, str] = {}
    eval_near = NearDuplicateIndex(config.near_duplicate_threshold)
    for uri in config.eval_sets:
        for record in artifacts.read_dialogues(uri):
            for t in record.turns:
                if t["role"] == "user" and normalise(t["content"]) not in eval_exact:
                    eval_exact[normalise(t["content"])] = uri
                    eval_near.insert(t["content"])

    train = artifacts.DatasetWriter(storage.join(config.output, "train"), config.shard_rows)
    validation = artifacts.DatasetWriter(
        storage.join(config.output, "validation"), config.shard_rows
    )
    rejects: list[str] = []
    seen: dict[str, str] = {}
    questions = NearDuplicateIndex(config.near_duplicate_threshold)
    per_source: dict[str, dict[str, int]] = {}
    by_reason: dict[str, int] = {}

    def reject(record: Dialogue, reason: str, counts: dict[str, int]) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        by_reason[reason] = by_reason.get(reason, 0) + 1
        rejects.append(
            json.dumps(
                {"where": record.id, "reason": reason, "raw": _first_question(record)[:200]},
                ensure_ascii=False,
            )
        )

    for source in config.sources:
        counts = per_source.setdefault(source.path, {"in": 0, "train": 0, "validation": 0})
        for record in artifacts.read_dialogues(source.path):
            counts["in"] += 1
            fingerprint = _fingerprint(record)
            question = _first_question(record)
            if fingerprint in seen:
                reject(record, "exact duplicate", counts)
                continue
            if normalise(question) in eval_exact:
                reject(record, "question in an evaluation set", counts)
                continue
            if eval_near.most_similar(question)[0] >= config.near_duplicate_threshold:
                reject(record, "near duplicate of an evaluation question", counts)
                continue
            if not questions.add(question):
                reject(record, "near duplicate question", counts)
                continue
            seen[fingerprint] = record.id
            if _unit(config.seed, "sample", record.id) >= source.ratio:
                counts["sampled_out"] = counts.get("sampled_out", 0) + 1
                continue
            if _unit(config.seed, "split", record.id) < config.validation_fraction:
                validation.write(record)
                counts["validation"] += 1
            else:
                train.write(record)
                counts["train"] += 1
        log.info("mixture: %s -> %s", source.path, counts)

    cfg = to_dict(config)
    train_manifest = train.finish("mixture", cfg, split="train")
    validation_manifest = validation.finish("mixture", cfg, split="validation")
    storage.write_bytes(
        storage.join(config.output, artifacts.REJECTS),
        ("\n".join(rejects) + "\n" * bool(rejects)).encode(),
    )
    manifest = {
        "schema_version": artifacts.SCHEMA_VERSION,
        "kind": "mixture",
        "stage": "mixture",
        "created": artifacts.now(),
        "rows": train_manifest["rows"] + validation_manifest["rows"],
        "splits": {"train": train_manifest["rows"], "validation": validation_manifest["rows"]},
        "per_source": per_source,
        "rejects": {"count": len(rejects), "by_reason": by_reason, "file": artifacts.REJECTS},
        "config": cfg,
        "inputs": [artifacts.input_summary(s.path) for s in config.sources]
        + [{"uri": u, "role": "evaluation set"} for u in config.eval_sets],
    }
    storage.write_json(storage.join(config.output, artifacts.MANIFEST), manifest)
    return manifest


def main(config: MixtureConfig) -> dict:
    from huatuo_ray.runtime import connect

    if storage.exists(storage.join(config.output, artifacts.MANIFEST)) and not config.overwrite:
        log.info("%s is already complete; overwrite=true redoes it", config.output)
        return artifacts.read_manifest(config.output)  # no Ray started for it
    connect(config.cluster, "mixture")
    if storage.exists(config.output):
        storage.delete(config.output)
    return mix(config)
