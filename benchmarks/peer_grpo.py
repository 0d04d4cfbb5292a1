"""The ``grpo`` stage against TRL's ``GRPOTrainer`` on the same model and the same work, one
after the other in one run, as a user choosing between the two would try them.

    python benchmarks/peer_grpo.py            # CPU: 16 prompts x 4 answers of 64 tokens
    python benchmarks/peer_grpo.py --gpu      # one GPU: every group of ours on it (HF rollouts)
    python benchmarks/peer_grpo.py --smoke    # the smallest run (the tests'), TRL beside ours

The work of one step, on both sides: a tiny Llama built from a config (hidden 256 x 4 layers,
vocab 2,000, random weights; the ``tiny-model`` stage's tokenizer), ``--prompts`` prompts x 4
answers of exactly ``--tokens`` tokens (EOS ignored), sampled on the Hugging Face model (ours:
the HF engine's own decoding loop, ``inference/decode_loop.py``; TRL: ``generate``); every layer
trained; GRPO advantages; KL to the frozen starting model (k3) in the loss with beta 0.04; a
Python reward function (:func:`target_word`); one optimizer step per rollout (one epoch, one
minibatch of all answers); AdamW at lr 1e-6. Ours: the ``grpo`` stage on a local Ray of the
machine's CPUs: policy (``--policy-workers``, 1), reference, reward-function and ``--engines``
(2) HF rollout engines, an equal share of the CPUs each (0.4 on 2 cores), so the two engines
decode half the answers each in one batch at the same time (one torch thread each: the stage's
thread rule), then the reference and the policy take both cores in turn, ``--micro`` (16) rows of
similar lengths per forward (the prompts' lengths differ: their padding is trimmed), the one
optimizer step accumulated over them; ``--gpu``: one engine
and every group on the one GPU (the hybrid engine). Ours, ``shared``: the same stage with
policy, reference, reward function and one engine in one process (``colocate_in_process``, the
layout veRL's hybrid worker uses), its torch threads all the CPUs, the weights copied in memory.
TRL:
``GRPOTrainer`` (``use_vllm=False``: HF ``generate`` of all answers in one batch; on CPUs
``use_cpu``, torch's default threads).

Figures: ``samples_per_s`` in steady state (the first iteration, warm-up, left out): answers
per second of wall clock between the ends of consecutive iterations (ours: the stage's
``elapsed_s`` per iteration; TRL: a callback at each step's end); ``ours_vs_trl`` and
``shared_vs_trl`` are ours over TRL's. The three sides run one after the other; each runs in a fresh Python process, as a user would start it; ``startup_s`` is
the seconds from that process's launch to its first iteration's start (imports, Ray's start
and the stage's own start-up, the manifest's ``startup_s``, for ours; imports and building the
trainer for TRL); ``startup_vs_trl`` and ``shared_startup_vs_trl`` are ours over TRL's. TRL is an optional benchmark dependency (``pip install trl``), not one of
the project's.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "token")

GROUP = 4  # answers per prompt
SIDES = ("ours", "shared", "trl")  # ours: a process per group; shared: one for all; TRL
BETA = 0.04
LR = 1e-6
TARGET = "的"


def target_word(prompt: str, response: str, reference: str, meta: dict[str, Any]) -> float:
    """The reward of both sides: how often the target word occurs in the answer (at most 8)."""
    return float(min(response.count(TARGET), 8))


def trl_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    return [
        target_word("", c if isinstance(c, str) else c[-1]["content"], "", {}) for c in completions
    ]


def build(root: str, args: argparse.Namespace) -> tuple[str, str, list[list[int]]]:
    """(model folder, prompt artifact, prompt token ids): the tiny Llama and the prompts."""
    from transformers import AutoTokenizer

    from huatuo_ray import artifacts
    from huatuo_ray.dialogue import Dialogue, encode_prompt
    from huatuo_ray.models.tiny import TinyConfig, build_tiny_causal_lm, demo_corpus

    shape = TinyConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                       vocab_size=args.vocab)  # fmt: skip
    model = build_tiny_causal_lm(os.path.join(root, "model"), shape)
    lines = demo_corpus()
    records = [
        Dialogue(f"q{i}", "bench", [{"role": "user", "content": lines[i % len(lines)]},
                                    {"role": "assistant", "content": lines[(i + 1) % len(lines)]}])
        for i in range(args.prompts)
    ]  # fmt: skip
    artifacts.write_all(os.path.join(root, "prompts"), records, "benchmark", {})
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = [encode_prompt(tokenizer, r.turns[:1]) for r in records]
    return model, os.path.join(root, "prompts"), ids


def ours_config(args: argparse.Namespace, root: str, model: str, prompts: str) -> Any:
    from huatuo_ray.config import ClusterConfig, ModelConfig
    from huatuo_ray.inference.generation import EngineConfig, SamplingConfig
    from huatuo_ray.rlmf import ppo_config
    from huatuo_ray.rlmf.actors.group import Resources
    from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig

    # Every worker an equal share of the CPUs (all on the one GPU with --gpu; the shared side:
    # one process on one bundle of those CPUs summed).
    shared = args.gpu or args.shared_process
    workers = 2 + args.engines + args.policy_workers
    cpus = 0.25 if args.gpu else int(100 * (os.cpu_count() or 2) / workers) / 100
    res = Resources(workers=1, num_cpus=cpus, num_gpus=1.0 if args.gpu else 0.0)
    engines = Resources(workers=args.engines, num_cpus=cpus, num_gpus=res.num_gpus)
    policy = Resources(workers=args.policy_workers, num_cpus=cpus, num_gpus=res.num_gpus)
    rows = args.prompts * GROUP
    return ppo_config.GRPOConfig(
        inputs=[prompts],
        output=os.path.join(root, args.side),
        model=ModelConfig(path=model),
        reward=ppo_config.RewardConfig(
            kind="function", function="benchmarks.peer_grpo:target_word", resources=res
        ),
        policy=ppo_config.PolicyConfig(
            trainable_layers=None,  # every layer, as TRL trains them (a separate reference)
            optim=OptimConfig(lr=LR, warmup_ratio=0.0, min_lr_ratio=1.0),
            deepspeed=DeepSpeedConfig(zero_stage=0, precision="bf16" if args.gpu else "fp32"),
            resources=policy,
        ),
        reference=ppo_config.ReferenceConfig(mode="separate", resources=res),
        rollout=ppo_config.RolloutConfig(
            engine=EngineConfig(
                backend="hf", max_model_len=1024, hf_batch_prompts=True, hf_max_batch=rows
            ),  # fmt: skip
            resources=engines,
            chunk_size=rows // args.engines,  # one share, decoded in one batch, per engine
        ),
        sampling=SamplingConfig(
            n=GROUP, temperature=1.0, top_p=1.0, ignore_eos=True, max_new_tokens=args.tokens
        ),  # fmt: skip
        kl=ppo_config.KLConfig(init_beta=BETA, placement="loss", estimator="k3"),
        iterations=args.iterations,
        rollout_size=args.prompts,
        minibatch_size=rows,
        micro_batch_size=min(args.micro, rows // args.policy_workers),
        ppo_epochs=1,
        max_prompt_tokens=1024,
        checkpoint=ppo_config.CheckpointEvery(every_iterations=10**6),
        colocate=[["rollout", "policy", "reference", "reward"]] if shared else [],
        colocate_in_process=args.shared_process,
        cluster=ClusterConfig(address="auto"),
    )


def run_ours(args: argparse.Namespace, root: str, model: str, prompts: str) -> dict[str, Any]:
    import ray

    from huatuo_ray.rlmf import ppo

    ray.init(num_cpus=None if args.gpu else os.cpu_count(), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    stage_started = time.time()
    try:
        manifest = ppo.main(ours_config(args, root, model, prompts))
    finally:
        ray.shutdown()
    history = [
        json.loads(line) for line in Path(root, args.side, "metrics.jsonl").read_text().splitlines()
    ]
    ends = [h["elapsed_s"] for h in history]
    steady = (ends[-1] - ends[0]) / (len(ends) - 1)
    parts = {k: round(sum(h[k] for h in history[1:]) / (len(history) - 1), 3)
             for k in ("generate_s", "engine_generate_s", "experience_s", "train_s", "sync_s",
                       "policy_train_s")}  # fmt: skip
    return {
        "samples_per_s": round(args.prompts * GROUP / steady, 2),
        "iteration_s": round(steady, 3),
        "first_step_at": stage_started + manifest["startup_s"],
        "stage_startup_s": manifest["startup_s"],
        "startup_steps": manifest["startup_steps"],
        "first_iteration_s": manifest["first_iteration_s"],
        "passes": manifest["passes"],
        "torch_threads": manifest["torch_threads"],
        "processes": manifest["processes"],
        "engine": "hf (the project's decoding loop)",  # engine.hf_decoder's default, a Llama
        **parts,
    }


class StepClock:
    """A TRL callback: the wall clock at each step's start and end."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *a: Any, **k: Any) -> None:
                clock.begins.append(time.time())

            def on_step_end(self, *a: Any, **k: Any) -> None:
                clock.ends.append(time.time())

        self.begins: list[float] = []
        self.ends: list[float] = []
        self.callback = Callback()


def run_trl(
    args: argparse.Namespace, root: str, model: str, ids: list[list[int]]
) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    # The same prompt tokens as ours (our chat format), given as text.
    texts = [tokenizer.decode(p, skip_special_tokens=False) for p in ids]
    if tokenizer.bos_token and all(t.startswith(tokenizer.bos_token) for t in texts):
        texts = [t[len(tokenizer.bos_token) :] for t in texts]
    rows = args.prompts * GROUP
    config = GRPOConfig(
        output_dir=os.path.join(root, "trl"),
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        steps_per_generation=1,  # one optimizer step per rollout, as ours
        num_iterations=1,
        max_completion_length=args.tokens,
        generation_kwargs={"min_new_tokens": args.tokens},  # exactly --tokens tokens, as ours
        temperature=1.0,
        top_p=1.0,
        beta=BETA,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=args.iterations,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_vllm=False,
        use_cpu=not args.gpu,
        bf16=args.gpu,
        seed=0,
        dataloader_num_workers=0,
    )
    dtype = torch.bfloat16 if args.gpu else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    dataset = Dataset.from_dict({"prompt": texts * args.iterations * 2})
    clock = StepClock()
    trainer = GRPOTrainer(
        model=policy, reward_funcs=trl_reward, args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[clock.callback],
    )  # fmt: skip
    trainer.train()
    ends = clock.ends
    steady = (ends[-1] - ends[0]) / (len(ends) - 1)
    return {
        "samples_per_s": round(rows / steady, 2),
        "iteration_s": round(steady, 3),
        "first_step_at": clock.begins[0],
        "first_iteration_s": round(ends[0] - clock.begins[0], 3),
        "engine": "hf (generate)",
        "version": trl.__version__,
    }


def side(name: str, root: str, args: argparse.Namespace) -> dict[str, Any]:
    """One side in a fresh Python process, as a user would start it: its start-up counts from
    the process's launch (imports included) to its first step's start."""
    import subprocess

    keys = ("hidden", "layers", "heads", "vocab", "prompts", "tokens", "iterations", "engines",
            "policy_workers", "micro")  # fmt: skip
    argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys]
    argv += ["--gpu"] if args.gpu else []
    # The ours side's reward function lives in this script: its Ray workers import it by module
    # path (benchmarks.peer_grpo), so the project's root goes on their path.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    launched = time.time()
    res = subprocess.run(
        [sys.executable, __file__, *argv, "--side", name, "--root", root],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    if res.returncode:
        sys.stderr.write(res.stderr[-6000:])
        raise SystemExit(f"peer_grpo: the {name} side failed (code {res.returncode})")
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    figures["startup_s"] = round(figures.pop("first_step_at") - launched, 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step (x 4 answers)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--iterations", type=int, default=6, help="steps of each side")
    parser.add_argument("--gpu", action="store_true", help="one GPU (HF rollouts on both sides)")
    parser.add_argument("--engines", type=int, default=2, help="our rollout engines (CPU)")
    parser.add_argument("--policy-workers", type=int, default=1, help="our policy ranks (CPU)")
    parser.add_argument("--micro", type=int, default=16,
                        help="our rows per forward (rows of similar lengths together)")  # fmt: skip
    parser.add_argument("--only", choices=SIDES, help="run one side only")
    parser.add_argument("--smoke", action="store_true", help="the smallest run")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The shared side: policy, reference, reward and one engine in one process
    # (colocate_in_process); on one GPU every group shares it (in processes of their own).
    args.shared_process = args.side == "shared"
    if args.gpu or args.shared_process:
        args.engines = args.policy_workers = 1  # one GPU or one process: the hybrid engine
    if args.smoke:
        args.hidden, args.layers, args.heads, args.prompts, args.tokens, args.iterations = (
            64, 2, 2, 2, 8, 2)  # fmt: skip
    if args.side:  # one side in a fresh process (see side())
        root = args.root
        model, prompts = os.path.join(root, "model"), os.path.join(root, "prompts")
        if args.side in ("ours", "shared"):
            figures = run_ours(args, root, model, prompts)
        else:
            ids = json.loads(Path(root, "prompt_ids.json").read_text())
            figures = run_trl(args, root, model, ids)
        print(json.dumps(figures))
        return
    load = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as root:
        _, _, ids = build(root, args)
        Path(root, "prompt_ids.json").write_text(json.dumps(ids))
        names = [name for name in SIDES if args.only in (None, name)]
        if args.smoke:  # the tests' run checks that the sides work, not their figures: TRL
            # beside ours, our two one after the other (three at once starve what else runs)
            names = [n for n in names if n != "ours" or args.only == "ours"]
            with ThreadPoolExecutor(len(names)) as pool:  # shared and TRL at once; the
                # per-group layout is run by the stage's own tests
                results = dict(zip(names, pool.map(lambda n: side(n, root, args), names)))
        else:  # one after the other, each alone on the machine
            for name in names:
                results[name] = side(name, root, args)
    for name, figures in results.items():
        print(f"{name:5s} " + "  ".join(f"{k} {v}" for k, v in figures.items()))
    summary: dict[str, Any] = {f"{n}_{k}": v for n, r in results.items() for k, v in r.items()}
    trl = results.get("trl")
    for name, ours in results.items():
        if trl and name != "trl":
            summary[f"{name}_vs_trl"] = round(ours["samples_per_s"] / trl["samples_per_s"], 3)
            start = "startup_vs_trl" if name == "ours" else f"{name}_startup_vs_trl"
            summary[start] = round(ours["startup_s"] / trl["startup_s"], 3)
    machine = "GPU" if args.gpu else f"CPU, {os.cpu_count()} cores"
    print(json.dumps({
        **summary,
        "model": f"llama {args.hidden} x {args.layers} layers, vocab {args.vocab} (random)",
        "work": f"{args.prompts} prompts x {GROUP} answers x {args.tokens} tokens, "
                f"{args.iterations} steps",
        "load_average_start": [round(x, 2) for x in load],  # 1, 5, 15 minutes
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{machine}, {platform.machine()}",
    }))  # fmt: skip


if __name__ == "__main__":
    main()
