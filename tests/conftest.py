"""Shared fixtures. Real samples of the public datasets live in ../shared/datasets (read-only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray 2.60 turns token authentication on for new clusters; a client sends the token only when
# RAY_AUTH_MODE=token is set, and Ray reads it once per process, so it is set before Ray loads.
os.environ.setdefault("RAY_AUTH_MODE", "token")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real dataset samples not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with a tokenizer trained on the bundled corpus, built once."""
    from huatuo_ray.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(str(tmp_path_factory.mktemp("tiny") / "model"))
