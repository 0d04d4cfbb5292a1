"""The reward model: its loss by hand, and a learnable preference set learnt to >= 0.9 accuracy."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from huatuo_ray import artifacts
from huatuo_ray.config import ModelConfig
from huatuo_ray.dialogue import Dialogue, turn
from huatuo_ray.models.tiny import demo_corpus
from huatuo_ray.train import reward_model
from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig
from huatuo_ray.train.losses import pairwise_accuracy, pairwise_reward_loss


def test_pairwise_loss_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # -log sigmoid(2) = log(1 + e^-2); -log sigmoid(-1) = log(1 + e^1)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert float(pairwise_reward_loss(chosen, rejected)) == pytest.approx(expected, rel=1e-6)
    margin = torch.tensor([1.0, 0.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert float(pairwise_reward_loss(chosen, rejected, margin)) == pytest.approx(
        expected, rel=1e-6
    )
    assert float(pairwise_accuracy(chosen, rejected)) == 0.5


MARKER = "【请及时就医】"


def learnable_preferences(n: int, seed: int = 0) -> list[Dialogue]:
    """Chosen answers carry a marker phrase; rejected ones do not. Otherwise alike."""
    rng = random.Random(seed)
    lines = demo_corpus()
    records = []
    for i in range(n):
        question = rng.choice(lines)[:40]
        a, b = rng.choice(lines)[:60], rng.choice(lines)[:60]
        chosen, rejected = (a + MARKER, b) if i % 2 else (MARKER + a, b)
        records.append(
            Dialogue(
                f"pref-{i}",
                "preference",
                [turn("user", question)],
                {"chosen": chosen, "rejected": rejected, "prompt_id": f"p{i}", "margin": 2.0},
            )
        )
    return records


@pytest.mark.slow
def test_reward_model_learns_a_learnable_preference(
    local_ray, tiny_model_dir: str, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prefs = str(tmp_path / "prefs")
    artifacts.write_all(prefs, learnable_preferences(240), "test", {})
    cfg = reward_model.RewardModelConfig(
        preferences=prefs,
        output=str(tmp_path / "rm"),
        model=ModelConfig(path=tiny_model_dir),
        validation_fraction=0.2,
        max_length=256,
        micro_batch_size=8,
        global_batch_size=16,
        epochs=3,
        optim=OptimConfig(lr=2e-3, warmup_ratio=0.1),
        deepspeed=DeepSpeedConfig(zero_stage=2, precision="fp32"),
        storage_path=str(tmp_path / "ray_train"),
        run_name="rm-test",
    )
    manifest = reward_model.main(cfg)
    training = manifest["training"]
    accuracies = [h["val_accuracy"] for h in training["validation_history"]]
    assert training["best"]["accuracy"] == max(accuracies) >= 0.9
    stats = manifest["reward_normalisation"]
    assert stats["scores"] == 2 * training["train_pairs"] and stats["std"] > 0

    # The folder loads as a sequence classifier and ranks fresh pairs the same way.
    tokenizer = AutoTokenizer.from_pretrained(cfg.output)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.output).eval()
    assert model.config.num_labels == 1
    from huatuo_ray.train.preference_data import encode_response

    wins = 0
    fresh = learnable_preferences(40, seed=99)
    with torch.no_grad():
        for record in fresh:
            scores = [
                float(
                    model(
                        input_ids=torch.tensor([encode_response(tokenizer, record.turns, text)])
                    ).logits
                )
                for text in (record.meta["chosen"], record.meta["rejected"])
            ]
            wins += scores[0] > scores[1]
    assert wins / len(fresh) >= 0.85
