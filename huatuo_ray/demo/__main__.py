"""``make demo``: the whole recipe end to end on a local Ray, offline, with tiny models.

    python -m huatuo_ray.demo --output outputs/demo [--dry-run]

It runs ``jobs/tiny/pipeline.yaml`` (the recipe, written once) in this process, with every output
under ``--output``: the tiny model first, then vLLM's OpenAI-compatible server on it as the local
teacher (no API key, no network) for the rest — ``data``, stage 1 (``self-instruct``,
``dialogues``, ``polish``), the ``mixture``, ``sft``, the mixed feedback (``sample``, ``score``,
``reward-model``), ``ppo``, ``grpo`` (no critic), ``grpo`` on whole consultations (the teacher as
the patient and the rater) and ``dpo``, and the
evaluation (``benchmark``, ``judge``, ``consult`` of the models, ``judge`` of the
consultations, ``doctor-export`` and the ``report``). A step whose output is complete is
skipped, so a second run picks up where the first stopped.

A tiny random model writes meaningless text: the demo shows the plumbing, not a doctor. To use a
real teacher, see README "Using a hosted teacher".
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from huatuo_ray.config import load_config
from huatuo_ray.pipeline import PipelineConfig, Step, common_teacher, dry_run, run_in_process

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "jobs" / "tiny" / "pipeline.yaml"
LOCAL_KEY_ENV = "HUATUO_LOCAL_TEACHER_KEY"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the steps and check their inputs; run nothing"
    )
    args = parser.parse_args()
    out = Path(args.output).resolve()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault(LOCAL_KEY_ENV, "local-teacher-needs-no-key")
    os.chdir(REPO)  # the presets name bundled files relative to the repository
    started = time.time()
    print(f"huatuo-ray demo: {PIPELINE.relative_to(REPO)} -> {out}")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SystemExit("the demo's local teacher is vLLM's server: run `make install`") from None
    from huatuo_ray.inference.openai_server import vllm_server
    from huatuo_ray.runtime import free_port

    port = free_port()
    config = load_config(
        PipelineConfig,
        str(PIPELINE),
        [
            "address=local",
            f"project_dir={REPO}",
            f"rebase.target={out}",
            common_teacher(f"http://127.0.0.1:{port}/v1"),
        ],
    )
    if args.dry_run:
        config.dry_run = True
        dry_run(config)
        return
    with contextlib.ExitStack() as stack:
        teacher_up = False

        def before(index: int, step: Step) -> None:
            """The teacher starts on the tiny model once the first step has built it."""
            nonlocal teacher_up
            if index > 0 and not teacher_up:
                model = str(out / "models" / "base")
                stack.enter_context(vllm_server(model, name="tiny-teacher", port=port))
                teacher_up = True
            print(f"  {index:2d} {step.stage:<14} {Path(step.config).name}", flush=True)

        steps = run_in_process(config, before)
    summarise({s["stage"] + ("" if s["stage"] != "judge" else f":{s['config']}"): s for s in steps})
    print(f"done in {time.time() - started:.0f} s; artifacts and manifests under {out}")


def summarise(steps: dict[str, dict[str, Any]]) -> None:
    """One line per headline figure, read from the steps' manifests."""

    def result(stage: str) -> dict[str, Any]:
        return (steps.get(stage) or {}).get("result") or {}

    if mixture := result("mixture"):
        print(f"\nmixture: {mixture['splits']} from {len(mixture['per_source'])} sources")
    if training := result("sft").get("training"):
        print(
            f"sft: {training['steps']} steps, loss {training['train_loss'][0][1]:.3f} -> "
            f"{training['train_loss'][-1][1]:.3f}, best validation loss "
            f"{training['best_val_loss']:.3f}"
        )
    if fb := result("score").get("feedback"):
        print(
            f"score: {fb['pairs']} pairs, {fb['kept']} kept (consistency "
            f"{fb['consistency_rate']}, first slot won {fb['position_bias_rate']})"
        )
    if best := result("reward-model").get("training", {}).get("best"):
        print(f"reward model: validation accuracy {best['accuracy']:.2f} at step {best['step']}")
    for stage in ("ppo", "grpo"):
        if rl := result(stage).get("training"):
            first, last = rl["first"], rl["last"]
            print(
                f"{stage}: {rl['iterations']} iterations, reward {first['reward_mean']:.2f} -> "
                f"{last['reward_mean']:.2f}, KL {last['kl']:.2f}"
            )
    if best := result("dpo").get("training", {}).get("best"):
        print(f"dpo: validation preference accuracy {best['accuracy']:.2f} at step {best['step']}")
    for name, scores in result("benchmark").get("metrics", {}).items():
        shown = ", ".join(f"{k} {scores[k]:.1f}" for k in ("BLEU-1", "ROUGE-L", "Distinct-2"))
        print(f"benchmark ({name}): {shown}")
    for key, title in (
        ("judge:jobs/tiny/judge.yaml", "single-turn"),
        ("judge:jobs/tiny/judge.consult.yaml", "consultations"),
    ):  # the GRPO and DPO comparisons are in the report
        if table := result(key).get("results", {}).get("table"):
            overall = table.get("overall", {})
            print(
                f"judge ({title}): PPO vs SFT win/tie/loss {overall.get('win', 0)}/"
                f"{overall.get('tie', 0)}/{overall.get('loss', 0)}"
            )
    for stage, name in (("doctor-export", "form.html"), ("report", "report.html")):
        output = (steps.get(stage) or {}).get("output")
        if output:
            print(f"{stage}: {Path(output) / name}")


if __name__ == "__main__":
    main()
