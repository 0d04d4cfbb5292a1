"""Dataset artifacts: shards, manifest written last, rejects, local paths and file:// URIs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from huatuo_ray import artifacts, storage
from huatuo_ray.dialogue import Dialogue, turn


def dialogue(i: int) -> Dialogue:
    return Dialogue(
        id=f"t-{i}",
        source="test",
        turns=[turn("user", f"问题{i}？"), turn("assistant", f"回答{i}。")],
        meta={"n": i, "tags": ["a"]},
    )


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_writer_shards_manifest_and_rejects(tmp_path: Path, scheme: str) -> None:
    uri = scheme + str(tmp_path / "ds")
    writer = artifacts.DatasetWriter(uri, shard_rows=4)
    for i in range(10):
        writer.write(dialogue(i))
    writer.reject("in.csv:3", "missing answer")
    writer.reject("in.csv:7", "no answer for question_id 12 in answer.csv")
    writer.reject("in.csv:9", "no answer for question_id 345 in answer.csv")
    # Not complete before finish(): readers refuse a folder without a manifest.
    with pytest.raises(artifacts.ArtifactError, match="manifest.json is missing"):
        artifacts.read_manifest(uri)
    manifest = writer.finish("unit", {"k": 1}, inputs=[{"uri": "x"}])

    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
        "rejects.jsonl",
    ]
    assert manifest["rows"] == 10 and manifest["schema_version"] == 1
    assert manifest["rejects"] == {
        "count": 3,
        "by_reason": {"no answer for question_id N in answer.csv": 2, "missing answer": 1},
        "file": "rejects.jsonl",
    }
    assert manifest["config"] == {"k": 1} and manifest["inputs"] == [{"uri": "x"}]
    assert artifacts.read_manifest(uri) == manifest

    back = artifacts.read_dialogues(uri)
    assert back == [dialogue(i) for i in range(10)]
    rejects = artifacts.read_rejects(uri)
    assert rejects[1] == {
        "where": "in.csv:7",
        "reason": "no answer for question_id 12 in answer.csv",
        "raw": "",
    }
    # Plain Parquet: any tool reads the shards with the documented schema.
    table = pq.read_table(tmp_path / "ds" / "part-00000.parquet")
    assert table.schema.names == ["id", "source", "turns", "meta"]
    assert json.loads(table.column("meta")[0].as_py()) == {"n": 0, "tags": ["a"]}


def test_schema_version_is_checked(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    artifacts.write_all(uri, [dialogue(0)], "unit", {})
    manifest = storage.read_json(storage.join(uri, "manifest.json"))
    manifest["schema_version"] = 99
    storage.write_json(storage.join(uri, "manifest.json"), manifest)
    with pytest.raises(artifacts.ArtifactError, match="schema_version 99"):
        artifacts.read_manifest(uri)


def test_write_bytes_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "f.json"
    storage.write_json(str(target), {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    assert not (tmp_path / "a" / "f.json.tmp").exists()
    assert storage.list_files(str(tmp_path / "a")) == [str(target)]
    assert storage.list_files("file://" + str(tmp_path / "a")) == ["file://" + str(target)]
