"""Preflight of a base model: a random model (or an unmerged weight delta) is refused before any
training; a model trained a few dozen steps on the bundled corpus is accepted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from huatuo_ray.models import preflight


def _train_a_little(model_dir: str, steps: int = 40) -> None:
    """A plain torch loop: next-token loss on 64-token windows of the bundled corpus."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lines = preflight.probe_lines(30)
    stream = [i for line in lines for i in tokenizer(line, add_special_tokens=False)["input_ids"]]
    batch = torch.tensor([stream[i : i + 64] for i in range(0, len(stream) - 64, 32)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)


def test_refuses_a_random_model_and_accepts_a_trained_one(tmp_path: Path) -> None:
    import torch

    from huatuo_ray.models.tiny import build_tiny_causal_lm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend on a shared 2-core machine
    try:
        model_dir = build_tiny_causal_lm(str(tmp_path / "model"))
        random = preflight.measure(model_dir)
        assert random.log_vocab == pytest.approx(math.log(2000))
        assert 0.95 < random.ratio < 1.1  # a random model guesses uniformly
        with pytest.raises(preflight.UntrainedModelError, match="untrained, or are a weight delta"):
            preflight.check_base_model(model_dir, allow_untrained=False)
        assert preflight.check_base_model(model_dir, allow_untrained=True) is None

        _train_a_little(model_dir)
        trained = preflight.check_base_model(model_dir, allow_untrained=False)
    finally:
        torch.set_num_threads(threads)
    assert trained is not None and trained.ratio < preflight.MAX_RATIO
    assert trained.tokens == random.tokens  # the same probe text


def test_tiny_presets_allow_untrained_and_paper_presets_do_not() -> None:
    from huatuo_ray.config import load_config
    from huatuo_ray.train import sft

    repo = Path(__file__).resolve().parents[2]
    assert load_config(sft.SFTConfig, str(repo / "jobs/tiny/sft.yaml")).allow_untrained
    for preset in ("paper", "open7b"):
        assert not load_config(sft.SFTConfig, str(repo / f"jobs/{preset}/sft.yaml")).allow_untrained
