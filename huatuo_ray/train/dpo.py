"""Stage ``dpo``: the policy straight from the mixed-feedback preferences, with no reward model
and no RL loop (Direct Preference Optimisation).

    python -m huatuo_ray dpo --config jobs/tiny/dpo.yaml

Reads the ``score`` stage's preference pairs (the data the reward model learns from), split into
train and validation by a hash of the prompt. The reference log-probs of every pair are computed
once, by a Ray Data pass of the frozen initial model (:class:`~huatuo_ray.train.dpo_loop.
ReferenceLogProbs`), so the trainers hold one model each and never recompute them. Then Ray Train
+ DeepSpeed trains the model with the DPO loss (``beta``, ``label_smoothing``) or IPO
(``loss: ipo``); validation preference accuracy (the implicit reward beta x (log pi - log pi_ref)
ranks the chosen answer higher) is measured each epoch and the most accurate weights are kept.
The output is a Hugging Face causal-LM folder plus manifest: ``benchmark``, ``judge``, ``consult``
and ``serve`` take it like the SFT or PPO model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from huatuo_ray import artifacts
from huatuo_ray.config import option, to_dict
from huatuo_ray.train.deepspeed_setup import OptimConfig
from huatuo_ray.train.preference_data import PairStageConfig, promote_pair_model
from huatuo_ray.train.ray_trainer import begin, fit

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DPOConfig(PairStageConfig):
    """Train the policy on preference pairs with DPO or IPO."""

    beta: float = option(0.1, help="strength of the pull towards the reference (DPO's beta)")
    loss: Literal["sigmoid", "ipo"] = option(
        "sigmoid",
        help="sigmoid: DPO; ipo: IPO's squared loss (h - 1/(2 beta))^2 on summed sequence "
        "log-probs, the paper's form (TRL's ipo averages log-probs per token, so its beta is "
        "not comparable with this one)",
    )
    label_smoothing: float = option(
        0.0, help="assumed share of flipped labels (conservative DPO); sigmoid loss only"
    )
    reference_batch_size: int = option(8, help="pairs per forward of the reference pass")
    reference_gpus: float = option(
        0.0, help="GPUs of the reference pass (1 on GPU clusters: it runs in bf16 there)"
    )
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-7))
    run_name: str = option("dpo", help="run name under storage_path: the same name resumes")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        if self.label_smoothing and self.loss == "ipo":
            raise ValueError("label_smoothing applies to the sigmoid loss only")


def main(config: DPOConfig) -> dict[str, Any]:
    from huatuo_ray.train.dpo_loop import train_loop
    from huatuo_ray.train.preference_data import prepare_preferences

    if (done := begin(config, "dpo")) is not None:
        return done
    prepared = prepare_preferences(config)
    datasets = with_reference(config, {k: pairs for k, (pairs, _) in prepared.items()})
    train_pairs = datasets["train"].count()
    fit(train_loop, config, datasets, train_pairs)
    return finish(config, prepared, train_pairs)


def with_reference(config: DPOConfig, splits: dict[str, Any]) -> dict[str, Any]:
    """Each split's pairs with the frozen initial model's log-probs of each side: one pass over
    every split, so the model is loaded once (one actor, not one per split), then the splits
    apart again, each materialised."""
    import pyarrow as pa

    from huatuo_ray.train.core import load_tokenizer
    from huatuo_ray.train.dpo_loop import ReferenceLogProbs

    _, pad_id = load_tokenizer(config.model)
    names = list(splits)
    tagged = [
        splits[name].map_batches(
            lambda t, i=i: t.append_column(SPLIT, pa.array([i] * t.num_rows, pa.int32())),
            batch_format="pyarrow",
        )
        for i, name in enumerate(names)
    ]
    scored = (
        (tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0])
        .map_batches(
            ReferenceLogProbs,
            fn_constructor_args=(config.model.path, pad_id, config.reference_batch_size),
            batch_size=64,
            batch_format="pyarrow",
            concurrency=1,
            num_cpus=1,
            num_gpus=config.reference_gpus,
        )
        .materialize()
    )
    return {
        name: scored.filter(lambda r, i=i: r[SPLIT] == i).drop_columns([SPLIT]).materialize()
        for i, name in enumerate(names)
    }


SPLIT = "_split"  # which split a pair came from, while they pass the reference together


def finish(config: DPOConfig, prepared: dict, train_pairs: int) -> dict[str, Any]:
    """Move the best weights into place as the model artifact and write its manifest."""
    state, training = promote_pair_model(config, prepared, train_pairs)
    training["best"]["reward_margin"] = state["best"]["val_reward_margin"]
    inputs = [artifacts.input_summary(config.preferences)]
    artifacts.write_model_manifest(
        config.output, "dpo", to_dict(config), inputs=inputs, head="AutoModelForCausalLM",
        training=training,
    )  # fmt: skip
    return artifacts.read_manifest(config.output)
