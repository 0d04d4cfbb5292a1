"""``make demo``: the recipe's stages that exist so far, end to end on a local Ray, offline.

    python -m huatuo_ray.demo --output outputs/demo

It builds the tiny model, starts vLLM's OpenAI-compatible server on it as the local teacher (no
API key, no network), and runs the ``jobs/tiny`` presets in order on one local Ray: ``data`` for
the bundled consultations and cases (written for this project), then stage 1 — ``self-instruct``,
``dialogues``, ``polish`` — the ``mixture``, ``sft`` (2 Ray Train workers, DeepSpeed ZeRO-2 on
CPU), the mixed feedback — ``sample``, ``score``, the ``reward-model`` — then ``ppo`` (rollout, policy,
critic and reward actor groups), and the evaluation: ``benchmark``, ``judge`` (single-turn, PPO vs
SFT), ``consult`` for both models (each served by vLLM for the run, the teacher as patient), a
``judge`` of the consultations, ``doctor-export`` (the form for human raters) and the ``report``.

A tiny random model writes meaningless text: the demo shows the plumbing, not a doctor. To use a
real teacher, change the preset's ``teacher`` block (e.g. ``teacher.base_url`` and
``teacher.model``; the key comes from the variable ``teacher.api_key_env`` names).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from huatuo_ray.config import load_config
from huatuo_ray.stages import STAGES

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs" / "tiny"
LOCAL_KEY_ENV = "HUATUO_LOCAL_TEACHER_KEY"


def run_stage(stage: str, preset: str, out: Path, **overrides: str) -> dict:
    """Run one preset of ``jobs/tiny`` with its outputs moved under ``out``."""
    config_cls, run = STAGES[stage].load()
    config = load_config(config_cls, str(JOBS / preset), [f"{k}={v}" for k, v in overrides.items()])
    started = time.time()
    result = run(config)
    print(f"  {stage:<14} {preset:<22} {time.time() - started:6.1f} s")
    return result


@contextlib.contextmanager
def local_teacher(model_dir: str):
    """vLLM's server on the tiny model; the scripted stand-in where vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        from tests.support.openai_servers import ScriptedOpenAIServer
        from tests.support.scripted_teacher import medical_responder

        print("vLLM is not installed: using the scripted stand-in teacher")
        with ScriptedOpenAIServer(medical_responder, models=("tiny-teacher",)) as server:
            yield server.base_url
        return
    from huatuo_ray.inference.openai_server import vllm_server

    with vllm_server(model_dir, name="tiny-teacher") as base_url:
        yield base_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/demo")
    out = Path(parser.parse_args().output).resolve()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault(LOCAL_KEY_ENV, "local-teacher-needs-no-key")
    started = time.time()
    print(f"huatuo-ray demo -> {out}")
    os.chdir(REPO)  # the presets name bundled files relative to the repository

    model_dir = run_stage("tiny-model", "tiny-model.yaml", out, output=str(out / "models/base"))
    d = out / "data"
    run_stage("data", "data.yaml", out, output=str(d / "consultations"), overwrite="true")
    run_stage("data", "data.cases.yaml", out, output=str(d / "cases"), overwrite="true")
    s = out / "distill"
    r = out / "rlmf"
    with local_teacher(model_dir) as base_url:
        teacher = {"teacher.base_url": base_url}
        run_stage(
            "self-instruct", "self-instruct.yaml", out, output=str(s / "self_instruct"), **teacher
        )
        run_stage(
            "dialogues",
            "dialogues.yaml",
            out,
            input=str(d / "cases"),
            output=str(s / "dialogues"),
            **teacher,
        )
        run_stage(
            "polish",
            "polish.yaml",
            out,
            input=str(d / "consultations"),
            output=str(s / "polish"),
            **teacher,
        )
        sources = (
            "["
            + ", ".join(f"{{path: {s / n}}}" for n in ("self_instruct", "dialogues", "polish"))
            + "]"
        )
        mixture = run_stage(
            "mixture",
            "mixture.yaml",
            out,
            output=str(out / "mixture"),
            sources=sources,
            overwrite="true",
        )
        sft_dir = str(out / "models" / "sft")
        sft = run_stage(
            "sft",
            "sft.yaml",
            out,
            train=str(out / "mixture" / "train"),
            validation=str(out / "mixture" / "validation"),
            output=sft_dir,
            **{
                "model.path": model_dir,
                "storage_path": str(out / "ray_train"),
                "run_name": f"sft-{int(started)}",
            },
        )
        run_stage(
            "sample",
            "sample.yaml",
            out,
            inputs=f"[{d / 'consultations'}]",
            output=str(r / "samples"),
            overwrite="true",
            **{"model.path": sft_dir},
        )
        feedback = run_stage(
            "score",
            "score.yaml",
            out,
            input=str(r / "samples"),
            output=str(r / "preferences"),
            **teacher,
        )
    rm = run_stage(
        "reward-model",
        "reward-model.yaml",
        out,
        preferences=str(r / "preferences"),
        output=str(out / "models" / "reward"),
        **{
            "model.path": sft_dir,
            "storage_path": str(out / "ray_train"),
            "run_name": f"rm-{int(started)}",
        },
    )
    ppo_dir = out / "models" / "ppo"
    shutil.rmtree(ppo_dir, ignore_errors=True)  # a fresh SFT model: no checkpoint to resume
    rl = run_stage(
        "ppo",
        "ppo.yaml",
        out,
        inputs=f"[{d / 'consultations'}]",
        output=str(ppo_dir),
        **{"model.path": sft_dir, "reward.model.path": str(out / "models" / "reward")},
    )
    bench = run_stage(
        "benchmark",
        "benchmark.yaml",
        out,
        sets=f"[{{name: demo-consultations, path: {d / 'consultations'}}}]",
        output=str(out / "eval" / "benchmark"),
        **{"model.path": sft_dir},
    )
    e = out / "eval"
    ppo_model = str(ppo_dir)
    with local_teacher(model_dir) as base_url:
        teacher = {"teacher.base_url": base_url}
        models = {"a.model": ppo_model, "b.model": sft_dir}
        single = run_stage(
            "judge",
            "judge.yaml",
            out,
            questions=str(d / "consultations"),
            output=str(e / "judge"),
            overwrite="true",
            **models,
            **teacher,
        )
        for name, path in (("PPO", ppo_model), ("SFT", sft_dir)):
            run_stage(
                "consult",
                "consult.yaml",
                out,
                cases=str(d / "cases"),
                name=name,
                doctor_model=path,
                output=str(e / f"consult-{name.lower()}"),
                overwrite="true",
                **teacher,
            )
        multi = run_stage(
            "judge", "judge.consult.yaml", out, output=str(e / "judge-consult"),
            overwrite="true", **{"a.answers": str(e / "consult-ppo"),
                                 "b.answers": str(e / "consult-sft")}, **teacher,
        )  # fmt: skip
    run_stage(
        "doctor-export",
        "doctor-export.yaml",
        out,
        pairs=str(e / "judge-consult"),
        output=str(e / "doctors" / "for-raters"),
        key_output=str(e / "doctors" / "private"),
    )
    models_dir = out / "models"
    made = run_stage(
        "report", "report.yaml", out, output=str(e / "report"),
        benchmarks=f"[{e / 'benchmark'}]",
        comparisons=f"[{{title: 'Single-turn: PPO vs SFT (table 4)', path: {e / 'judge'}}}, "
        f"{{title: 'Consultations: PPO vs SFT (table 5)', path: {e / 'judge-consult'}}}]",
        training="[" + ", ".join(f"{{title: {t}, path: {models_dir / m / 'tensorboard'}}}"
                                 for t, m in (("SFT", "sft"), ("reward model", "reward"),
                                              ("PPO", "ppo"))) + "]",
        models=f"[{models_dir / 'sft'}, {models_dir / 'reward'}, {ppo_dir}]",
    )  # fmt: skip
    print(f"\nmixture: {mixture['splits']} from {len(mixture['per_source'])} sources")
    training = sft["training"]
    print(
        f"sft: {training['steps']} steps, loss {training['train_loss'][0][1]:.3f} -> "
        f"{training['train_loss'][-1][1]:.3f}, best validation loss {training['best_val_loss']:.3f}"
    )
    fb = feedback["feedback"]
    print(
        f"score: {fb['pairs']} pairs, {fb['kept']} kept (consistency {fb['consistency_rate']}, "
        f"first slot won {fb['position_bias_rate']})"
    )
    best = rm["training"]["best"]
    print(f"reward model: validation accuracy {best['accuracy']:.2f} at step {best['step']}")
    first, last = rl["training"]["first"], rl["training"]["last"]
    print(
        f"ppo: {rl['training']['iterations']} iterations, reward {first['reward_mean']:.2f} -> "
        f"{last['reward_mean']:.2f}, KL {last['kl']:.2f}, sync {last['sync_s'] * 1000:.0f} ms"
    )
    scores = bench["metrics"]["demo-consultations"]
    print(
        "benchmark: "
        + ", ".join(f"{k} {scores[k]:.1f}" for k in ("BLEU-1", "ROUGE-L", "Distinct-2"))
    )
    for title, result in (("single-turn", single), ("consultations", multi)):
        overall = result["results"]["table"].get("overall", {})
        print(f"judge ({title}): PPO vs SFT win/tie/loss {overall.get('win', 0)}/"
              f"{overall.get('tie', 0)}/{overall.get('loss', 0)}")  # fmt: skip
    print(f"doctor evaluation form: {e / 'doctors' / 'for-raters' / 'form.html'}")
    print(f"\nreport: {made['report']}")
    print(f"done in {time.time() - started:.0f} s; artifacts and manifests under {out}")
    print(
        "\nNote: the tiny model has random weights, so the distilled text is meaningless. For a\n"
        "real teacher, set in jobs/tiny/*.yaml: teacher.base_url, teacher.model and\n"
        "teacher.api_key_env (e.g. https://api.openai.com/v1, gpt-4o-mini, OPENAI_API_KEY),\n"
        "and drop structured_outputs."
    )


if __name__ == "__main__":
    main()
