"""Typed configs: YAML + overrides, and errors that name the key and the file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from huatuo_ray.config import ClusterConfig, ConfigError, describe, load_config, option
from huatuo_ray.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    """An inner section."""

    lr: float = option(1e-5, help="learning rate")
    layers: list[int] = option([1, 2], help="which layers")


@dataclass
class Outer:
    """A test config."""

    name: str = option(help="required name")
    steps: int = option(10, help="steps")
    mode: Literal["a", "b"] = option("a", help="mode")
    limit: int | None = option(None, help="optional limit")
    inner: Inner = option(Inner(), help="inner part")
    cluster: ClusterConfig = option(ClusterConfig(), help="ray")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be at least 1")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nsteps: 3\ninner:\n  lr: 0.5\n")
    cfg = load_config(
        Outer, path, ["inner.layers=[3, 4]", "limit=7", "mode=b", "name=123", "inner.lr=3e-3"]
    )
    assert cfg.name == "123"  # text on the command line stays text for a str field
    assert cfg.steps == 3 and cfg.limit == 7 and cfg.mode == "b"
    assert cfg.inner.lr == 0.003 and cfg.inner.layers == [3, 4]
    assert cfg.cluster.address is None
    # defaults are copied, never shared between instances
    assert (
        load_config(Outer, None, ["name=a"]).inner is not load_config(Outer, None, ["name=a"]).inner
    )


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("name: x\nstepz: 3\n", [], "c.yaml: unknown key 'stepz'"),
        ("name: x\ninner:\n  lrr: 1\n", [], "c.yaml: unknown key 'inner.lrr'"),
        ("name: x\nsteps: three\n", [], "c.yaml: steps: expected an integer"),
        ("name: x\nsteps: true\n", [], "c.yaml: steps: expected an integer"),
        ("name: x\nmode: c\n", [], "c.yaml: mode: expected one of 'a', 'b'"),
        ("name: x\ninner:\n  layers: [1, x]\n", [], "inner.layers[1]: expected an integer"),
        ("name: x\nsteps: 0\n", [], "c.yaml: Outer: steps must be at least 1"),
        ("steps: 2\n", [], "missing required key 'name'"),
        ("name: x\n", ["inner.lr=fast"], "command line: inner.lr: expected a number"),
        ("name: x\n", ["nope=1"], "command line: unknown key 'nope'"),
        ("name: x\n", ["steps"], "not key=value"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("name: [x\n", [], "not valid YAML"),
    ],
)
def test_errors_name_key_and_file(
    tmp_path: Path, text: str, overrides: list[str], message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, overrides)
    assert message in str(err.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config(Outer, "nowhere.yaml")


def test_describe_lists_every_leaf_with_help() -> None:
    text = "\n".join(describe(Outer))
    for key in ("name", "steps", "inner.lr", "inner.layers", "cluster.address"):
        assert f"  {key}:" in text
    assert "learning rate" in text and "required" in text


def test_every_shipped_yaml_loads() -> None:
    """Every preset under jobs/ names a stage and loads into its config."""
    files = sorted((REPO / "jobs").glob("*/*.yaml"))
    assert files, "no presets under jobs/"
    for path in files:
        stage = path.stem.split(".")[0]  # data.cases.yaml is a second preset of `data`
        assert stage in STAGES, f"{path}: no stage named {stage!r}"
        config_cls, _ = STAGES[stage].load()
        load_config(config_cls, str(path))
