"""SFT throughput: the stage against a plain single-process PyTorch loop, and packing vs padding.

    python benchmarks/sft_throughput.py                       # CPU: the Ray `sft` stage
    python benchmarks/sft_throughput.py --cuda                # GPU: the stage, bf16, 1 worker
    python benchmarks/sft_throughput.py --engine-only --cuda  # GPU without Ray: DeepSpeed bf16
    python benchmarks/sft_throughput.py --smoke               # the smallest run (the tests')

Both runs train the same model (random weights from a Llama config) on the same tokenised
samples and report real (non-padding) tokens per second:

* default: the ``sft`` stage (Ray Train, ``--workers`` workers sharing the machine's CPUs, or
  one GPU each with ``--cuda``; DeepSpeed ZeRO-2; packing) on dialogues built from the bundled
  demo corpus; its tokens/s is the median of its per-step figures, and ``data_wait_fraction``
  the share of its step time spent waiting for the next micro-batch (from the manifest);
* ``--engine-only``: one DeepSpeed engine in this process (ZeRO-2, bf16 on GPU) with the
  stage's packing and block-causal mask, for machines that have a GPU but no Ray;

against a plain loop (``torch.optim.AdamW``, the same packed rows, the same resources: all the
CPUs, or one GPU) measured in the same run.
Efficiencies: the share of non-padding tokens with packing on (packed rows of ``max_length``)
and off (length-grouped micro-batches padded to their longest sample). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huatuo_ray.dialogue import IGNORE_INDEX  # noqa: E402
from huatuo_ray.train.packing import block_causal_mask, efficiency, group_by_length, pack, pad_batch  # noqa: E402


def synthetic_samples(n: int, vocab: int, max_length: int, seed: int) -> list[dict[str, list[int]]]:
    """Token samples with an SFT-like length spread: prompt masked, answer supervised."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        length = min(max_length, max(16, int(rng.lognormvariate(5.6, 0.7))))  # median ~270
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        prompt = max(1, int(length * rng.uniform(0.2, 0.5)))
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


def padding_efficiency(samples: list[dict], micro_batch: int, grouped: bool = True) -> float:
    """Non-padding share of micro-batches padded to their longest sample; ``grouped``: sorted by
    length first, as the stage does when packing is off (else in the data's own order)."""
    ordered = group_by_length(samples) if grouped else samples
    real = total = 0
    for i in range(0, len(ordered), micro_batch):
        r, t = efficiency(pad_batch(ordered[i : i + micro_batch], pad_id=0))
        real, total = real + r, total + t
    return real / total


def build_model(args: argparse.Namespace, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.max_length,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def batches(rows: list[dict], micro_batch: int, device: str):
    for i in range(0, len(rows) - micro_batch + 1, micro_batch):
        chunk = rows[i : i + micro_batch]
        yield {k: torch.tensor([r[k] for r in chunk], device=device) for k in chunk[0]}


def run_loop(model, rows, args, device, dtype, step_fn) -> tuple[float, float]:
    """(real tokens/s, seconds) over the rows after ``args.warmup`` warm-up micro-batches."""
    real = 0
    started = None
    for i, b in enumerate(batches(rows, args.micro_batch, device)):
        if i == args.warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started, real = time.perf_counter(), 0
        out = model(
            input_ids=b["input_ids"],
            labels=b["labels"],
            position_ids=b["position_ids"],
            attention_mask=block_causal_mask(b["segment_ids"], dtype),
        )
        step_fn(out.loss)
        real += int((b["segment_ids"] > 0).sum())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return real / seconds, seconds


def plain_loop(rows, args, device, dtype, model_dir: str | None = None) -> float:
    if model_dir:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).train()
    else:
        model = build_model(args, dtype, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    accumulation = args.global_batch // args.micro_batch
    count = [0]

    def step(loss: torch.Tensor) -> None:
        (loss / accumulation).backward()
        count[0] += 1
        if count[0] % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    tokens_per_s, _ = run_loop(model, rows, args, device, dtype, step)
    return tokens_per_s


def engine_loop(rows, args, device, dtype) -> tuple[float, float]:
    """One DeepSpeed engine (ZeRO-2) with the stage's settings; (tokens/s, peak GiB)."""
    import deepspeed

    from huatuo_ray.train.core import init_process_group
    from huatuo_ray.train.deepspeed_setup import (
        DeepSpeedConfig,
        OptimConfig,
        engine_config,
        make_optimizer,
    )

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    init_process_group(device == "cuda")  # the stage's own call, so both sides start alike
    model = build_model(args, dtype, device).train()
    ds = DeepSpeedConfig(zero_stage=2, precision="bf16" if dtype == torch.bfloat16 else "fp32")
    optim = OptimConfig(lr=1e-5)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=make_optimizer(model, ds, optim, device == "cuda"),
        config=engine_config(
            ds,
            optim,
            args.micro_batch,
            args.global_batch // args.micro_batch,
            dtype == torch.bfloat16,
        ),
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    tokens_per_s, _ = run_loop(engine, rows, args, device, dtype, step)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return tokens_per_s, peak


def stage_inputs(args: argparse.Namespace) -> tuple[Path, str, list[dict]]:
    """The tiny model and dialogues built from the bundled corpus, and their tokenised samples."""
    from huatuo_ray import artifacts
    from huatuo_ray.dialogue import Dialogue, turn
    from huatuo_ray.models.tiny import TinyConfig, build_tiny_causal_lm, demo_corpus

    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    tiny = TinyConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64, vocab_size=args.vocab,
                      intermediate_size=args.hidden * 8 // 3 // 64 * 64, max_position_embeddings=args.max_length)  # fmt: skip
    model_dir = build_tiny_causal_lm(str(work / "model"), tiny)
    lines = demo_corpus()
    rng = random.Random(0)
    records = []
    for i in range(args.samples):
        q = "".join(rng.sample(lines, rng.randint(1, 2)))
        a = "".join(rng.sample(lines, rng.randint(1, 6)))
        records.append(Dialogue(f"bench-{i}", "bench", [turn("user", q), turn("assistant", a)]))
    artifacts.write_all(str(work / "data"), records, "benchmark", {})
    from transformers import AutoTokenizer

    from huatuo_ray.dialogue import tokenize_dialogue

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = []
    for r in records:
        t = tokenize_dialogue(tokenizer, r.turns, args.max_length)
        samples.append({"input_ids": t.input_ids, "labels": t.labels})
    return work, model_dir, samples


def stage_tokens_per_s(
    args: argparse.Namespace, work: Path, model_dir: str
) -> tuple[float, int, dict]:
    """Run the real `sft` stage on those dialogues: the median of its per-step tokens/s (the
    first step warms up), its step count, and its manifest's step timing."""
    from huatuo_ray.config import ClusterConfig, ModelConfig, ScalingConfig
    from huatuo_ray.train import sft
    from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig

    cpus = max(1, (os.cpu_count() or 2) // args.workers)
    manifest = sft.main(
        sft.SFTConfig(
            train=str(work / "data"),
            output=str(work / "out"),
            model=ModelConfig(path=model_dir),
            max_length=args.max_length,
            micro_batch_size=args.micro_batch,
            global_batch_size=args.global_batch * args.workers,
            epochs=1,
            shuffle_buffer=0,
            optim=OptimConfig(lr=1e-5),
            deepspeed=DeepSpeedConfig(zero_stage=2, precision="bf16" if args.cuda else "fp32"),
            scaling=ScalingConfig(
                num_workers=args.workers,
                use_gpu=args.cuda,
                cpus_per_worker=1 if args.cuda else cpus,
            ),
            storage_path=str(work / "ray_train"),
            run_name="bench",
            allow_untrained=True,  # a random tiny model
            cluster=ClusterConfig(num_cpus=None if args.cuda else os.cpu_count()),
        )
    )
    training = manifest["training"]
    per_step = [v for _, v in training["tokens_per_s"]][1:] or [training["tokens_per_s"][0][1]]
    return statistics.median(per_step), len(training["tokens_per_s"]), training["step_timing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-only", action="store_true", help="no Ray: one DeepSpeed engine")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU in bf16")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=240)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="the stage's Ray Train workers")
    parser.add_argument("--smoke", action="store_true", help="the smallest run (seconds)")
    args = parser.parse_args()
    if args.smoke:  # what the test suite runs: every path, minimal sizes
        args.hidden, args.layers, args.max_length, args.samples, args.warmup = 64, 1, 512, 40, 1
    device = "cuda" if args.cuda else "cpu"
    dtype = torch.bfloat16 if args.cuda else torch.float32

    if args.engine_only:
        samples, work, model_dir = (
            synthetic_samples(args.samples, args.vocab, args.max_length, 0),
            None,
            None,
        )
    else:
        work, model_dir, samples = stage_inputs(args)
    rows = pack(samples, args.max_length, pad_id=0)
    real, total = efficiency({k: [r[k] for r in rows] for k in rows[0]})
    figures: dict[str, object] = {
        "packing_efficiency": round(real / total, 4),
        "padding_efficiency": round(padding_efficiency(samples, args.micro_batch), 4),
        "padding_efficiency_ungrouped": round(
            padding_efficiency(samples, args.micro_batch, False), 4
        ),
        "model": f"llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}",
        "max_length": args.max_length,
        "micro_batch": args.micro_batch,
    }
    plain = plain_loop(rows, args, device, dtype, model_dir)
    if args.cuda:
        torch.cuda.empty_cache()  # the stage's worker is another process on the same GPU
    if args.engine_only:
        engine, peak = engine_loop(rows, args, device, dtype)
        figures.update(
            mode="deepspeed engine (ZeRO-2), no Ray",
            tokens_per_s_deepspeed=round(engine, 1),
            peak_memory_gib=round(peak, 2) if peak is not None else None,
            ratio_vs_plain_loop=round(engine / plain, 3),
        )
    else:
        stage, steps, timing = stage_tokens_per_s(args, work, model_dir)
        figures.update(
            mode=f"sft stage: Ray Train, {args.workers} worker(s), DeepSpeed ZeRO-2",
            tokens_per_s_stage=round(stage, 1),
            stage_steps=steps,
            ratio_vs_plain_loop=round(stage / plain, 3),
            data_wait_fraction=timing["data_wait_fraction"],
            stage_step_timing=timing,
        )
    figures["tokens_per_s_plain"] = round(plain, 1)
    if "ray" in sys.modules:
        import ray

        ray.shutdown()  # so that no worker log lands after the JSON line
    figures["device"] = (
        torch.cuda.get_device_name() if args.cuda else f"{platform.machine()} {os.cpu_count()} cpus"
    )
    figures["dtype"] = str(dtype).replace("torch.", "")
    print(
        f"{figures['mode']}: ratio to the plain loop {figures['ratio_vs_plain_loop']}, "
        f"packing efficiency {figures['packing_efficiency']}, padding {figures['padding_efficiency']}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
