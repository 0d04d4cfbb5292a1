"""Relative paths inside a Ray job's temporary copy of the working directory resolve against the
root (``root=`` or ``$HUATUO_ROOT``), never inside the copy; without a root the stage refuses in
one line; outside a copy nothing moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from huatuo_ray import locations
from huatuo_ray.config import load_config
from huatuo_ray.data.convert import DataConfig
from huatuo_ray.inputs import UserError
from huatuo_ray.train.sft import SFTConfig

REPO = Path(__file__).resolve().parents[1]


def ray_copy(tmp_path: Path) -> Path:
    """A folder laid out as Ray lays out a job's working directory, with the bundled demo data."""
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    data = copy / "huatuo_ray" / "demo" / "data"
    data.mkdir(parents=True)
    (data / "consultations.jsonl").write_text("{}\n")
    return copy


def test_job_copy_is_found_from_any_folder_inside_it(tmp_path: Path) -> None:
    copy = ray_copy(tmp_path)
    assert locations.job_copy(str(copy)) == str(copy)
    assert locations.job_copy(str(copy / "huatuo_ray")) == str(copy)
    assert locations.job_copy(str(tmp_path)) is None


def test_relative_paths_go_under_the_root_and_bundled_inputs_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = ray_copy(tmp_path)
    root = tmp_path / "shared"
    monkeypatch.delenv(locations.ROOT_ENV, raising=False)
    config = load_config(DataConfig, str(REPO / "jobs/tiny/data.yaml"))
    assert locations.settle("data", config, str(root), cwd=str(copy)) == str(root)
    assert config.output == str(root / "outputs/tiny/data/consultations")
    assert config.input == str(copy / "huatuo_ray/demo/data/consultations.jsonl")  # the code's
    # The same from the nodes' environment, and an input already under the root is read there.
    (root / "outputs/tiny/models/base").mkdir(parents=True)
    monkeypatch.setenv(locations.ROOT_ENV, str(root))
    sft = load_config(SFTConfig, str(REPO / "jobs/tiny/sft.yaml"))
    locations.settle("sft", sft, cwd=str(copy))
    assert sft.model.path == str(root / "outputs/tiny/models/base")
    assert sft.train == str(root / "outputs/tiny/mixture/train")  # made by an earlier job
    assert sft.storage_path == str(root / "outputs/tiny/ray_train")
    assert locations.outputs("sft", sft) == {"output": str(root / "outputs/tiny/models/sft")}


def test_without_a_root_the_stage_refuses_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = ray_copy(tmp_path)
    monkeypatch.delenv(locations.ROOT_ENV, raising=False)
    config = load_config(DataConfig, str(REPO / "jobs/tiny/data.yaml"))
    with pytest.raises(UserError) as e:
        locations.settle("data", config, cwd=str(copy))
    message = str(e.value)
    assert "\n" not in message and str(copy) in message
    assert "output=outputs/tiny/data/consultations" in message
    assert "HUATUO_ROOT" in message and "root=" in message
    # Absolute paths and URIs need no root; a hub id is no path.
    config.output = str(tmp_path / "out")
    assert locations.settle("data", config, cwd=str(copy)) is None
    sft = load_config(SFTConfig, str(REPO / "jobs/tiny/sft.yaml"),
                      [f"train={tmp_path}/t", f"validation={tmp_path}/v", "output=s3://b/sft",
                       f"storage_path={tmp_path}/rt", "model.path=Qwen/Qwen2.5-0.5B"])  # fmt: skip
    assert locations.settle("sft", sft, cwd=str(copy)) is None
    assert sft.model.path == "Qwen/Qwen2.5-0.5B"


def test_outside_a_job_copy_nothing_moves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(locations.ROOT_ENV, str(tmp_path))
    config = load_config(DataConfig, str(REPO / "jobs/tiny/data.yaml"))
    assert locations.settle("data", config, cwd=str(REPO)) is None
    assert config.output == "outputs/tiny/data/consultations"
    assert locations.outputs("data", config) == {
        "output": str(Path.cwd() / "outputs/tiny/data/consultations")
    }
