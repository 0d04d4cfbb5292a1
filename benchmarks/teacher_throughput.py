"""Teacher throughput: the Ray Data teacher pipeline against a server's own bound.

A loopback OpenAI-compatible server answers each request after a fixed latency and serves at most
``cap`` requests at once, so no client can beat ``cap / latency`` requests per second. The
self-instruct answer step (``run_teacher_map`` with ``answer_record``: prompt building, the
client's retries/cache/limits, parsing, records) pushes N requests through it; a plain sequential
``openai`` loop runs in the same process as the baseline.

The cache figure: N answers written on the event loop to a local-disk cache in the segment layout
(``aput``, flushes in a worker thread) against the one-file-per-answer layout of earlier versions
(one blocking atomic write per answer), same run; ``cache_speedup`` is the ratio of answers per
second, ``max_loop_stall_ms`` the longest the event loop went without running a 1 ms ticker while
the segment cache wrote (the old layout's stall is printed beside it).

    python benchmarks/teacher_throughput.py [--requests 1200] [--latency 0.25] [--cap 12]

Printed: the pipeline's throughput end to end (Ray Data actor start-up included) and in steady
state (first to last answer), each as a ratio to the bound, and the speed-up over the sequential
loop. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import openai

from huatuo_ray.config import TeacherConfig
from huatuo_ray.dialogue import Dialogue, turn
from huatuo_ray.distill.self_instruct import answer_record
from huatuo_ray.teacher.cache import LegacyCache, ResponseCache, request_key
from huatuo_ray.teacher.stage import run_teacher_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the loopback server lives in tests/
from tests.support.openai_servers import ScriptedOpenAIServer  # noqa: E402

KEY = "sk-benchmark"


def answer(body: dict) -> str:
    return "您好，建议您注意休息，多喝温水，如果症状持续请及时就医。"


def rows(n: int) -> list[dict]:
    return [
        Dialogue(
            f"bench-{i:06d}",
            "self_instruct",
            [turn("user", f"请解释第{i}个问题：长期咳嗽需要做哪些检查？")],
            {"role": "呼吸内科医生", "instruction": "解释", "input": ""},
        ).to_row()
        for i in range(n)
    ]


async def _write_answers(put, n: int) -> tuple[float, float]:
    """(answers per second, longest event-loop stall in ms) of ``await put(i)`` for i < n."""
    stall, running = 0.0, True

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall, last = max(stall, now - last - 0.001), now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    for i in range(n):  # answers arrive one per loop iteration, as from the network
        await put(i)
        await asyncio.sleep(0)
    rate = n / (time.perf_counter() - started)
    running = False
    await tick
    return rate, stall * 1000


def cache_figures(n: int) -> dict:
    record = {"text": "您好，建议您注意休息，多喝温水。" * 8, "usage": {"prompt_tokens": 60}}
    keys = [request_key("m", [{"role": "user", "content": f"问题{i}"}], {}) for i in range(n)]
    folder = tempfile.mkdtemp(prefix="cache-bench-")
    legacy = LegacyCache(os.path.join(folder, "legacy"))
    segments = ResponseCache(os.path.join(folder, "segments"))

    async def put_legacy(i: int) -> None:
        legacy.put(keys[i], record)  # what the client did: a blocking write on the loop

    async def put_segment(i: int) -> None:
        await segments.aput(keys[i], record)

    async def run_segments() -> tuple[float, float]:
        rate, stall = await _write_answers(put_segment, n)
        await segments.aflush()
        return rate, stall

    legacy_rate, legacy_stall = asyncio.run(_write_answers(put_legacy, n))
    segment_rate, segment_stall = asyncio.run(run_segments())
    assert len(ResponseCache(os.path.join(folder, "segments"))) == n
    return {
        "cache_answers": n,
        "cache_legacy_answers_per_s": round(legacy_rate, 1),
        "cache_segment_answers_per_s": round(segment_rate, 1),
        "cache_speedup": round(segment_rate / legacy_rate, 2),
        "max_loop_stall_ms": round(segment_stall, 2),
        "legacy_max_loop_stall_ms": round(legacy_stall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--cap", type=int, default=12)
    parser.add_argument("--sequential", type=int, default=20, help="requests of the baseline")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--cache-answers", type=int, default=5000, help="answers of the cache figure"
    )
    parser.add_argument("--smoke", action="store_true", help="the smallest run (seconds)")
    args = parser.parse_args()
    if args.smoke:  # what the test suite runs: every figure, minimal sizes
        args.requests, args.latency, args.sequential, args.cache_answers = 48, 0.05, 4, 300
    cache = cache_figures(args.cache_answers)

    import ray

    os.environ["HUATUO_BENCH_KEY"] = KEY
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    bound = args.cap / args.latency
    with ScriptedOpenAIServer(answer, latency_s=args.latency, max_concurrency=args.cap) as server:
        # Baseline: a plain sequential loop with the openai client.
        client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
        started = time.perf_counter()
        for i in range(args.sequential):
            client.chat.completions.create(
                model="scripted-teacher", messages=[{"role": "user", "content": f"问题{i}"}]
            )
        sequential_rps = args.sequential / (time.perf_counter() - started)

        teacher = TeacherConfig(
            base_url=server.base_url,
            model="scripted-teacher",
            api_key_env="HUATUO_BENCH_KEY",
            max_concurrency=args.cap,
            timeout_s=30,
        )
        output = tempfile.mkdtemp(prefix="teacher-bench-")
        server.reset_stats()
        started = time.perf_counter()
        result = run_teacher_map(
            rows(args.requests),
            answer_record,
            teacher,
            output,
            workers=args.workers,
            batch_size=4 * args.cap,
            fn_kwargs={"retries": 0},
            stage="benchmark",
        )
        elapsed = time.perf_counter() - started
        stats = server.stats
    ray.shutdown()
    assert len(result.records) == args.requests, result.rejects[:3]
    steady = (
        stats.last_answer_time - stats.first_answer_time if stats.first_answer_time else elapsed
    )
    # n answers over the span between the first and the last one: n - 1 intervals.
    steady_rps = (args.requests - 1) / steady if steady > 0 else float("nan")
    end_to_end_rps = args.requests / elapsed
    figures = {
        "requests": args.requests,
        "latency_s": args.latency,
        "server_cap": args.cap,
        "bound_rps": round(bound, 2),
        "pipeline_rps_end_to_end": round(end_to_end_rps, 2),
        "pipeline_rps_steady": round(steady_rps, 2),
        "ratio_to_bound": round(steady_rps / bound, 3),
        "ratio_to_bound_end_to_end": round(end_to_end_rps / bound, 3),
        "sequential_rps": round(sequential_rps, 2),
        "speedup_vs_sequential": round(end_to_end_rps / sequential_rps, 2),
        "max_server_concurrency": stats.max_concurrency,
        **cache,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    print(
        f"bound {bound:.1f} req/s; pipeline {end_to_end_rps:.1f} req/s end to end "
        f"({figures['ratio_to_bound_end_to_end']:.2f} of bound), {steady_rps:.1f} req/s steady "
        f"({figures['ratio_to_bound']:.2f}); sequential {sequential_rps:.2f} req/s; "
        f"speed-up {figures['speedup_vs_sequential']:.1f}x"
    )
    print(
        f"cache: segments {cache['cache_segment_answers_per_s']:.0f} answers/s vs one file per "
        f"answer {cache['cache_legacy_answers_per_s']:.0f} ({cache['cache_speedup']:.1f}x); "
        f"longest loop stall {cache['max_loop_stall_ms']:.1f} ms (old layout "
        f"{cache['legacy_max_loop_stall_ms']:.1f} ms)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
