"""DPO: its losses by hand, and the stage on the learnable preference set of the reward model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from huatuo_ray import artifacts
from huatuo_ray.config import ModelConfig
from huatuo_ray.train import dpo
from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig
from huatuo_ray.train.losses import dpo_loss, response_logprobs
from tests.train.test_reward_model import learnable_preferences


def _log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def test_dpo_and_ipo_losses_by_hand() -> None:
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0]), torch.tensor([-4.0, -5.0])
    # h = (pc - rc) - (pr - rr): pair 0: 0.5 - 0 = 0.5; pair 1: -1 - 1 = -2
    loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    expected = -(_log_sigmoid(0.25) + _log_sigmoid(-1.0)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert r_chosen.tolist() == pytest.approx([0.25, -0.5])
    assert r_rejected.tolist() == pytest.approx([0.0, 0.5])
    # label smoothing 0.1: 0.9 x -log sigmoid(beta h) + 0.1 x -log sigmoid(-beta h)
    loss, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5, label_smoothing=0.1)
    expected = -sum(0.9 * _log_sigmoid(x) + 0.1 * _log_sigmoid(-x) for x in (0.25, -1.0)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # IPO: (h - 1 / (2 beta))^2 = (0.5 - 1)^2, (-2 - 1)^2
    loss, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5, kind="ipo")
    assert float(loss) == pytest.approx((0.25 + 9.0) / 2)
    # Equal to the reference: h = 0, loss log 2 whatever beta.
    loss, _, _ = dpo_loss(chosen, rejected, chosen, rejected, 3.0)
    assert float(loss) == pytest.approx(math.log(2))


def test_response_logprobs_sum_only_the_response_tokens() -> None:
    # Vocabulary of 2; uniform logits except where the next token is made certain.
    logits = torch.zeros(1, 4, 2)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0)])  # p(token 1 | first two) = 3/4
    ids = torch.tensor([[0, 0, 1, 0]])
    mask = torch.tensor([[0, 0, 1, 1]])  # a prompt of 2 tokens, a response of 2
    expected = math.log(0.75) + math.log(0.5)
    assert float(response_logprobs(logits, ids, mask)) == pytest.approx(expected, rel=1e-6)


def dpo_config(prefs: str, model: str, tmp_path: Path, **overrides) -> dpo.DPOConfig:
    values = dict(
        preferences=prefs,
        output=str(tmp_path / "dpo"),
        model=ModelConfig(path=model),
        validation_fraction=0.2,
        max_length=256,
        micro_batch_size=8,
        global_batch_size=16,
        epochs=3,
        beta=0.1,
        optim=OptimConfig(lr=2e-3, warmup_ratio=0.1),
        deepspeed=DeepSpeedConfig(zero_stage=2, precision="fp32"),
        storage_path=str(tmp_path / "ray_train"),
        run_name="dpo-test",
    )
    return dpo.DPOConfig(**(values | overrides))


def test_dpo_config_checks() -> None:
    with pytest.raises(ValueError, match="beta"):
        dpo_config("p", "m", Path("/tmp"), beta=0.0)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_config("p", "m", Path("/tmp"), loss="ipo", label_smoothing=0.1)


@pytest.mark.slow
def test_dpo_learns_a_learnable_preference_and_vllm_serves_it(
    local_ray, tiny_model_dir: str, tmp_path: Path, vllm_check
) -> None:
    from transformers import AutoModelForCausalLM

    prefs = str(tmp_path / "prefs")
    artifacts.write_all(prefs, learnable_preferences(240), "test", {})
    # One epoch with a validation every 6 steps: accuracy is past 0.9 by the epoch's end (2 more
    # epochs only lowered the loss further, at 2.5x the time).
    cfg = dpo_config(prefs, tiny_model_dir, tmp_path, epochs=1, eval_every_steps=6)
    manifest = dpo.main(cfg)
    training = manifest["training"]
    history = training["validation_history"]
    accuracies = [h["val_accuracy"] for h in history]
    # Validations at steps 6 and 12: the epoch's end (step 12) is not validated twice.
    assert [h["step"] for h in history] == [6, 12]
    assert training["best"]["accuracy"] == max(accuracies) >= 0.9
    losses = [loss for _, loss in training["train_loss"]]
    assert losses[0] == pytest.approx(math.log(2), abs=0.05), losses  # starts at the reference
    assert sum(losses[-3:]) / 3 < math.log(2) - 0.1, losses
    assert manifest["kind"] == "model" and manifest["stage"] == "dpo"
    model = AutoModelForCausalLM.from_pretrained(cfg.output)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(base.lm_head.weight, model.lm_head.weight)

    import ray

    # vLLM loads the folder and answers a chat through its template.
    ask = [{"role": "user", "content": "头痛怎么办？"}]
    assert len(ray.get(vllm_check.chat.remote(cfg.output, ask, 8))) > 0


def test_one_reference_pass_scores_every_split_and_keeps_them_apart(
    local_ray, tiny_model_dir: str, tmp_path: Path
) -> None:
    """The frozen model is loaded once for all splits; each split comes back with exactly its
    own pairs, each with its reference log-probs, and without the pass's split tag."""
    from huatuo_ray.train.preference_data import prepare_pairs

    rows = [r.to_row() for r in learnable_preferences(12)]
    splits = {
        name: prepare_pairs(part, tiny_model_dir, 128, in_driver_below=1000)[0]
        for name, part in (("train", rows[:8]), ("validation", rows[8:]))
    }
    cfg = dpo_config(str(tmp_path / "prefs"), tiny_model_dir, tmp_path)
    scored = dpo.with_reference(cfg, splits)
    for name, pairs in splits.items():
        got = list(scored[name].iter_rows())
        assert sorted(tuple(r["chosen_ids"]) for r in got) == sorted(
            tuple(r["chosen_ids"]) for r in pairs.iter_rows()
        )
        assert set(got[0]) == {*pairs.columns(), "ref_chosen", "ref_rejected"}
        assert all(r["ref_chosen"] < 0 and r["ref_rejected"] < 0 for r in got)
