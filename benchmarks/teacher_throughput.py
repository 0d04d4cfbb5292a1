"""Teacher throughput: the Ray Data teacher pipeline against a server's own bound.

A loopback OpenAI-compatible server answers each request after a fixed latency and serves at most
``cap`` requests at once, so no client can beat ``cap / latency`` requests per second. The
self-instruct answer step (``run_teacher_map`` with ``answer_record``: prompt building, the
client's retries/cache/limits, parsing, records) pushes N requests through it; a plain sequential
``openai`` loop runs in the same process as the baseline.

    python benchmarks/teacher_throughput.py [--requests 1200] [--latency 0.25] [--cap 12]

Printed: the pipeline's throughput end to end (Ray Data actor start-up included) and in steady
state (first to last answer), each as a ratio to the bound, and the speed-up over the sequential
loop. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--cap", type=int, default=12)
    parser.add_argument("--sequential", type=int, default=20, help="requests of the baseline")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

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
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    print(
        f"bound {bound:.1f} req/s; pipeline {end_to_end_rps:.1f} req/s end to end "
        f"({figures['ratio_to_bound_end_to_end']:.2f} of bound), {steady_rps:.1f} req/s steady "
        f"({figures['ratio_to_bound']:.2f}); sequential {sequential_rps:.2f} req/s; "
        f"speed-up {figures['speedup_vs_sequential']:.1f}x"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
