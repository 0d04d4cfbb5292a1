"""Stage `sft` on real samples: 2 CPU workers with DeepSpeed ZeRO-3 (in-process) and ZeRO-2 (a
job next to a `ray start` head, killed and resumed from its last checkpoint), best-on-validation,
the saved folder loads and generates (and vLLM serves it), the series reach the node's metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from huatuo_ray import artifacts
from huatuo_ray.config import ModelConfig
from huatuo_ray.data.convert import DataConfig, convert
from huatuo_ray.dialogue import RecordError, encode_prompt, tokenize_dialogue, turn
from huatuo_ray.distill import mixture
from huatuo_ray.train import sft
from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig
from huatuo_ray.train.packing import block_causal_mask, pack
from tests.conftest import ClusterHead
from tests.ray_head import MetricsScraper
from tests.support.crash import kill_when

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path, local_ray) -> Path:
    """Real single-turn doctor answers -> data stage -> mixture with a validation split."""
    root = tmp_path_factory.mktemp("sft-data")
    convert(
        DataConfig(
            source="cmd_csv",
            input=str(
                shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
            ),
            output=str(root / "cmd"),
            limit=120,
        )
    )
    mixture.main(
        mixture.MixtureConfig(
            output=str(root / "mix"),
            sources=[mixture.MixtureSource(str(root / "cmd"))],
            validation_fraction=0.2,
        )
    )
    return root / "mix"


def config(data: Path, model: str, out: Path, zero: int, **kw: object) -> sft.SFTConfig:
    values = dict(
        train=str(data / "train"),
        validation=str(data / "validation"),
        output=str(out / "model"),
        model=ModelConfig(path=model),
        max_length=192,
        micro_batch_size=2,
        global_batch_size=8,
        epochs=2,
        eval_every_steps=4,
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.1),
        deepspeed=DeepSpeedConfig(zero_stage=zero, precision="fp32"),
        storage_path=str(out / "ray_train"),
        run_name=f"sft-zero{zero}",
        allow_untrained=True,  # a random tiny model: the preflight would refuse it
    )
    values.update(kw)
    return sft.SFTConfig(**values)  # type: ignore[arg-type]


def validation_loss(model_dir: str, validation: str, max_length: int) -> float:
    """The saved model's token-weighted validation loss, computed here independently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    samples = []
    for d in artifacts.read_dialogues(validation):
        try:
            t = tokenize_dialogue(tokenizer, d.turns, max_length)
        except RecordError:  # rejected by the stage too
            continue
        samples.append({"input_ids": t.input_ids, "labels": t.labels})
    total = tokens = 0.0
    with torch.no_grad():
        for row in pack(samples, max_length, tokenizer.pad_token_id):
            r = {k: torch.tensor([v]) for k, v in row.items()}
            out = model(
                input_ids=r["input_ids"],
                labels=r["labels"],
                position_ids=r["position_ids"],
                attention_mask=block_causal_mask(r["segment_ids"], torch.float32),
            )
            n = int((r["labels"][:, 1:] != -100).sum())
            total += float(out.loss) * n
            tokens += n
    return total / tokens


def test_sft_zero3_trains_keeps_best_and_saves_a_model_vllm_serves(
    local_ray, sft_data: Path, tiny_model_dir: str, tmp_path: Path, vllm_check
) -> None:
    """ZeRO-3 with length-grouped padding, in this process's Ray (ZeRO-2 with packing: the
    killed-job test below, which checks the same of its resumed run)."""
    cfg = config(sft_data, tiny_model_dir, tmp_path, 3, packing=False)
    manifest = sft.main(cfg)
    check_trained_model(manifest, cfg.output, cfg.validation, cfg.max_length, tiny_model_dir)
    assert manifest["config"]["deepspeed"]["zero_stage"] == 3
    # Weights gathered from ZeRO-3 shards: vLLM loads the folder and answers a chat through its
    # template too.
    import ray

    ask = [{"role": "user", "content": "头痛怎么办？"}]
    assert len(ray.get(vllm_check.chat.remote(cfg.output, ask, 8))) > 0


def check_trained_model(
    manifest: dict, out: str, validation: str, max_length: int, initial: str
) -> None:
    """What a finished sft run must be: losses fall, the best validation loss kept (the folder's
    own, recomputed here), a folder that loads and generates, weights moved from ``initial``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    training = manifest["training"]
    losses = [loss for _, loss in training["train_loss"]]
    assert training["steps"] == len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05  # training loss falls
    history = [h["val_loss"] for h in training["validation_history"]]
    assert len(history) >= 3 and training["best_val_loss"] == min(history)
    assert manifest["kind"] == "model"
    assert list((Path(out) / "tensorboard").glob("events.out.tfevents.*"))

    # The folder holds the best weights: their validation loss is the best one seen in training.
    assert validation_loss(out, validation, max_length) == pytest.approx(min(history), abs=2e-3)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.chat_template and (Path(out) / "model.safetensors").exists()
    prompt = encode_prompt(tokenizer, [turn("user", "头痛三天了，怎么办？")])
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > len(prompt)
    # A parameter really changed from the initial model.
    base = AutoModelForCausalLM.from_pretrained(initial)
    assert not torch.equal(base.lm_head.weight, model.lm_head.weight)


# What the Grafana dashboard plots of a training stage (tests/test_cluster_metrics.py checks
# that each plotted series is exported by some stage).
SFT_SERIES = ["train_loss", "train_tokens_per_s", "train_lr", "train_grad_norm",
              "validation_loss", "progress_fraction"]  # fmt: skip


def test_killed_sft_job_resumes_from_its_last_checkpoint(
    sft_data: Path, tiny_model_dir: str, tmp_path: Path, cluster_head: ClusterHead
) -> None:
    """ZeRO-2 with packing, run next to the tests' `ray start` head as a user's driver joins a
    cluster: killed after its second checkpoint and rerun, it goes on from there, and the
    finished run is all an uninterrupted one must be (check_trained_model); its series reach the
    node's metrics endpoint tagged by stage and job, where Prometheus scrapes them."""
    out = tmp_path / "model"
    storage = tmp_path / "ray_train"
    cmd = [
        sys.executable, "-m", "huatuo_ray", "sft",
        "--train", str(sft_data / "train"), "--validation", str(sft_data / "validation"),
        "--output", str(out), f"model.path={tiny_model_dir}", "max_length=192",
        "micro_batch_size=2", "global_batch_size=8", "epochs=2", "eval_every_steps=4",
        "optim.lr=3e-3", "optim.warmup_ratio=0.1", "packing=true",
        "deepspeed.zero_stage=2", "deepspeed.precision=fp32", "checkpoint.every_steps=2",
        f"storage_path={storage}", "run_name=sft-killed", "allow_untrained=true",
    ]  # fmt: skip
    env = cluster_head.stage_env()
    with MetricsScraper(cluster_head.metrics_url) as scraper:  # while both runs run
        # Kill the job mid-run once its second checkpoint (step 4) is written.
        kill_when(cmd, REPO, env,
                  ready=lambda: len(list((storage / "sft-killed").glob("checkpoint_*"))) >= 2)  # fmt: skip
        assert not (out / "manifest.json").exists()
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    assert cluster_head.address.split(":")[1] in res.stderr  # it joined the head
    manifest = json.loads((out / "manifest.json").read_text())
    training = manifest["training"]
    restart = training["restarts"]
    assert len(restart) == 1 and restart[0] >= 2
    steps = [step for step, _ in training["train_loss"]]
    # The step count continued from the checkpoint instead of starting again at 1.
    assert steps == list(range(1, training["steps"] + 1))
    assert training["steps"] > restart[0]
    check_trained_model(manifest, str(out), str(sft_data / "validation"), 192, tiny_model_dir)
    assert manifest["config"]["deepspeed"]["zero_stage"] == 2 and manifest["config"]["packing"]
    assert not scraper.missing("sft", SFT_SERIES), (scraper.missing("sft", SFT_SERIES),
                                                     sorted(scraper.seen))  # fmt: skip


def _rows(dataset) -> list[dict]:
    return [{k: [int(x) for x in v] for k, v in row.items()} for row in dataset.iter_rows()]


@pytest.mark.parametrize("packing", [True, False])
def test_a_small_split_tokenised_in_the_driver_is_what_ray_data_makes(
    sft_data: Path, tiny_model_dir: str, packing: bool
) -> None:
    """``tokenize_in_driver_below``: a small split skips Ray Data's start-up, not its result: the
    same rows in the same order and the same rejects (48 tokens leave some answers with none)."""
    from huatuo_ray.train.data import prepare_split

    args = (str(sft_data / "train"), tiny_model_dir, 48, packing)
    on_ray_data = prepare_split(*args, in_driver_below=0)
    in_driver = prepare_split(*args, in_driver_below=1000)
    assert (in_driver.rows, in_driver.samples) == (on_ray_data.rows, on_ray_data.samples)
    assert in_driver.rejects == on_ray_data.rejects and len(on_ray_data.rejects) > 0
    assert _rows(in_driver.dataset) == _rows(on_ray_data.dataset)


def test_small_preference_pairs_tokenised_in_the_driver_are_what_ray_data_makes(
    local_ray, tiny_model_dir: str
) -> None:
    from huatuo_ray.train.preference_data import prepare_pairs
    from tests.train.test_reward_model import learnable_preferences

    rows = [r.to_row() for r in learnable_preferences(40)]
    on_ray_data, rejects_ray_data = prepare_pairs(rows, tiny_model_dir, 40, in_driver_below=0)
    in_driver, rejects = prepare_pairs(rows, tiny_model_dir, 40, in_driver_below=1000)
    assert rejects == rejects_ray_data and len(rejects) > 0  # 40 tokens: some pairs too long
    got, expected = list(in_driver.iter_rows()), list(on_ray_data.iter_rows())
    assert len(got) == len(expected) == 40 - len(rejects)
    for a, b in zip(got, expected):
        assert list(a["chosen_ids"]) == list(b["chosen_ids"]) and a["margin"] == b["margin"]
        assert list(a["rejected_ids"]) == list(b["rejected_ids"])
        assert a["prompt_len"] == b["prompt_len"]
