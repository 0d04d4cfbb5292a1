"""Models from URIs: a model folder served through a pyarrow filesystem (``file://``) is fetched
once per node into a checksummed cache, loads, and samples through the ``sample`` stage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from huatuo_ray.models import fetch


@pytest.fixture()
def served_model(tiny_model_dir: str, tmp_path: Path) -> str:
    """The tiny model copied into a 'bucket' folder and named by its file:// URI."""
    bucket = tmp_path / "bucket" / "models" / "sft"
    shutil.copytree(tiny_model_dir, bucket)
    return f"file://{bucket}"


def test_local_paths_and_hub_ids_are_unchanged(tmp_path: Path) -> None:
    assert fetch.local_model_path(str(tmp_path)) == str(tmp_path)
    assert fetch.local_model_path("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"


def test_fetched_once_checksummed_and_fetched_again_when_changed(
    served_model: str, tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache")
    source = Path(served_model[len("file://") :])
    local = fetch.local_model_path(served_model, cache)
    assert local.startswith(cache) and fetch.verify(local) == []
    manifest = json.loads((Path(local) / fetch.FETCH_MANIFEST).read_text())
    assert manifest["source"] == served_model
    weights = next(n for n in manifest["files"] if n.endswith(".safetensors"))
    assert manifest["files"][weights]["size"] == (source / weights).stat().st_size
    assert fetch.file_sha256(str(source / weights)) == manifest["files"][weights]["sha256"]
    # Once per node: a second call copies nothing (same inode, same mtime).
    before = os.stat(Path(local) / weights)
    assert fetch.local_model_path(served_model, cache) == local
    after = os.stat(Path(local) / weights)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    # A damaged copy (truncated) or a changed source is fetched again.
    with open(Path(local) / weights, "r+b") as f:
        f.truncate(10)
    assert fetch.local_model_path(served_model, cache) == local and fetch.verify(local) == []
    (source / "config.json").write_text((source / "config.json").read_text() + "\n")
    fetch.local_model_path(served_model, cache)
    assert (Path(local) / "config.json").read_bytes() == (source / "config.json").read_bytes()
    # Same size, other bytes: verify() names the file.
    data = bytearray((Path(local) / "config.json").read_bytes())
    data[0] ^= 1
    (Path(local) / "config.json").write_bytes(bytes(data))
    assert fetch.verify(local) == ["config.json"]


def test_a_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(fetch.FetchError, match="cannot list model folder|empty or missing"):
        fetch.local_model_path(f"file://{tmp_path}/nothing", str(tmp_path / "cache"))


def test_a_generator_on_a_uri_loads_and_samples(served_model: str, tmp_path: Path) -> None:
    from huatuo_ray.inference.generation import EngineConfig, SamplingConfig, make_generator

    os.environ["HUATUO_MODEL_CACHE"] = str(tmp_path / "cache")
    try:
        generator = make_generator(served_model, EngineConfig(backend="hf"))
    finally:
        del os.environ["HUATUO_MODEL_CACHE"]
    sampling = SamplingConfig(n=2, max_new_tokens=5, temperature=1.0)
    (samples,) = generator.generate([[1, 2, 3]], sampling, seeds=[0])
    assert len(samples) == 2 and all(0 < len(s.token_ids) <= 5 for s in samples)
    assert list((tmp_path / "cache").iterdir())  # it loaded from the cache


def test_an_unreadable_reward_manifest_is_an_error(tmp_path: Path) -> None:
    from huatuo_ray.rlmf.actors.frozen import reward_normalisation

    with pytest.raises(RuntimeError, match="reward normalisation: cannot read mean/std"):
        reward_normalisation(str(tmp_path))  # no manifest
    (tmp_path / "manifest.json").write_text('{"kind": "model"}')
    with pytest.raises(RuntimeError, match="reward.normalise: false"):
        reward_normalisation(str(tmp_path))  # a manifest without the statistics
    (tmp_path / "manifest.json").write_text('{"reward_normalisation": {"mean": 0.5, "std": 2}}')
    assert reward_normalisation(str(tmp_path)) == {"mean": 0.5, "std": 2.0}


@pytest.mark.slow
def test_the_sample_stage_samples_from_a_uri_model(
    served_model: str, tmp_path: Path, shared_datasets: Path
) -> None:
    import ray

    from huatuo_ray import artifacts
    from huatuo_ray.config import ClusterConfig, ModelConfig
    from huatuo_ray.data.convert import DataConfig, convert
    from huatuo_ray.inference.generation import EngineConfig, SamplingConfig
    from huatuo_ray.rlmf import sample

    convert(DataConfig(source="meddialog", output=str(tmp_path / "prompts"), limit=2,
                       input=str(shared_datasets / "covid_dialogue_zh" / "test_data.json")))  # fmt: skip
    local = fetch.local_model_path(served_model)  # the default cache, as on a cluster node
    started_ray = not ray.is_initialized()  # a new local Ray, whatever else runs on the machine
    try:
        manifest = sample.main(sample.SampleConfig(
            inputs=[str(tmp_path / "prompts")], output=str(tmp_path / "samples"),
            model=ModelConfig(path=served_model), engine=EngineConfig(backend="hf"),
            sampling=SamplingConfig(n=2, max_new_tokens=6, seed=3), max_prompt_tokens=900,
            cluster=ClusterConfig(address="local", num_cpus=2),
        ))  # fmt: skip
    finally:
        shutil.rmtree(local, ignore_errors=True)
        if started_ray:
            ray.shutdown()
    records = artifacts.read_dialogues(str(tmp_path / "samples"))
    assert manifest["model"] == served_model and manifest["rows"] == len(records) > 0
    assert all(len(r.meta["responses"]) == 2 for r in records)
