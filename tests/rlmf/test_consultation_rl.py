"""RL on whole consultations (issue 24) end to end, as a user runs it: ``jobs/tiny/grpo.consult.yaml``
next to the tests' `ray start` head, on real cases (HuatuoGPT-II's evaluation cases, with their
real dialogues) read by ``data``; the tiny policy as the doctor on HF rollouts, a loopback
teacher (real HTTP) as the patients and the rater, and the rule paying for a question in the
first doctor turn. One run, killed after a checkpoint and rerun, shows that rule's reward
rising, the engine's batch following the open consultations, a broken case's group dropped and
refilled, no request reaching the teacher twice, and the patients' budget (counted across the
restart) stopping the run cleanly with a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from huatuo_ray.data.convert import DataConfig, convert
from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV, ClusterHead
from tests.rlmf.test_critic_free import assert_reward_rose
from tests.support.crash import kill_when
from tests.support.openai_servers import ScriptedOpenAIServer

REPO = Path(__file__).resolve().parents[2]

# A system check (make test-system): two runs of a stage as a user starts them, next to a
# `ray start` head, with a kill between; the consultation machinery itself is in make test
# (tests/rlmf/test_consultation.py, test_teacher_reward.py).
pytestmark = [pytest.mark.slow, pytest.mark.system]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> str:
    out = tmp_path_factory.mktemp("cases") / "cases"
    convert(DataConfig(
        source="meddialog_cases",
        input=str(shared_datasets / "huatuogpt2_eval" / "huatuo100_conv" / "GPT4.json"),
        output=str(out), limit=6,
    ))  # fmt: skip
    return str(out)


def first_case_text(cases: str) -> str:
    from huatuo_ray import artifacts

    return next(iter(artifacts.read_dialogues(cases))).meta["medical_case"]


class Teacher:
    """The scripted teacher. As the rater it rates every pair 5 and 5, so that only the rule
    moves the reward. As the patient: a patient whose seed is even leaves after the doctor's
    first turn, an odd one stays; the case holding ``silent`` never answers (unparseable: its
    consultations break). Every request body is remembered."""

    def __init__(self, silent: str):
        self.silent = silent[:40]
        self.bodies: list[str] = []

    def __call__(self, body: dict) -> str:
        self.bodies.append(json.dumps(body, sort_keys=True, ensure_ascii=False))
        if "[Assistant A]" in body["messages"][-1]["content"]:
            return "Rating A: 5; Rating B: 5"
        system = body["messages"][0]["content"]
        if self.silent in system:
            return ""
        doctor_lines = sum(m["role"] == "user" for m in body["messages"]) - 1  # less the greeting
        if doctor_lines >= 1 and body.get("seed", 0) % 2 == 0:
            return "好的，谢谢医生，再见。"
        return f"医生，我这个情况有{doctor_lines + 2}天了。"


def test_consultation_rl_learns_to_ask_first_survives_a_kill_and_stops_at_its_budget(
    cases: str, tiny_model_dir: str, tmp_path: Path, cluster_head: ClusterHead
) -> None:
    teacher = Teacher(first_case_text(cases))
    out = tmp_path / "consult-rl"
    budget = 600  # patient requests: about 14 iterations of 16 consultations, not 20
    with ScriptedOpenAIServer(teacher, require_api_key=TEACHER_KEY) as server:
        endpoint = [f"base_url={server.base_url}", "model=scripted-teacher",
                    f"api_key_env={TEACHER_KEY_ENV}", "structured_outputs=false"]  # fmt: skip
        cmd = [
            sys.executable, "-m", "huatuo_ray", "grpo", "--config",
            str(REPO / "jobs/tiny/grpo.consult.yaml"), f"inputs=[{cases}]", f"output={out}",
            f"model.path={tiny_model_dir}",
            *(f"rollout.consultation.patient.{o}" for o in endpoint),
            *(f"reward.teacher.teacher.{o}" for o in endpoint),
            f"rollout.consultation.budget.max_requests={budget}", "reward.fallback=1.0",
            # the critic-free tests' learning settings: 4 cases x 4 consultations, 20 iterations
            "iterations=20", "rollout_size=4", "ppo_epochs=2", "sampling.max_new_tokens=16",
            "policy.optim.lr=0.01", "policy.optim.warmup_ratio=0", "policy.optim.min_lr_ratio=1",
        ]  # fmt: skip
        env = cluster_head.stage_env()
        latest, metrics = out / "checkpoints" / "latest", out / "metrics.jsonl"
        kill_when(cmd, REPO, env, poll_s=0.2, ready=lambda: (
            latest.exists() and len(metrics.read_text().splitlines()) >= 3))  # fmt: skip
        killed = [json.loads(line) for line in metrics.read_text().splitlines()]
        sent_before = len(teacher.bodies)
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        sent_after = len(teacher.bodies)
    assert res.returncode == 0, res.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    done = manifest["training"]["iterations"]
    assert manifest["training"]["restarts"] == [2] and 8 <= done < 20
    assert [h["iteration"] for h in records] == list(range(1, done + 1))

    # The rule's reward rose (the rater gave 5 and 5 throughout: no rating fell back).
    assert all(h["raw_score_mean"] == 5.0 for h in records)
    assert_reward_rose(records, 0.8)  # 2 x the share asking first: from about 1 in 16

    # The redone iteration 3 replayed its patients' lines and ratings from the cache and drew
    # the same consultations; nothing reached the teacher twice.
    assert len(set(teacher.bodies)) == len(teacher.bodies)
    usage = manifest["teacher_usage"]
    assert usage["patient"]["cached"] > 0 and usage["reward"]["cached"] > 0
    for key in ("reward_mean", "patient_requests", "doctor_turns", "response_length"):
        assert records[2][key] == pytest.approx(killed[2][key], rel=1e-4, abs=1e-5), key

    # The patients' budget counted what the first run paid up to its checkpoint, and stopped
    # the rerun cleanly between iterations with a checkpoint and the final model.
    paid = usage["patient"]["paid"] + usage["reward"]["paid"]
    assert sent_after - sent_before < paid <= sent_after
    assert manifest["stopped"] == "patient budget spent" and usage["patient"]["paid"] <= budget
    state = json.loads((out / "checkpoints" / f"iter_{done:06d}" / "state.json").read_text())
    assert state["iteration"] == done and (out / "model.safetensors").exists()
    teacher_paid = [h["teacher_paid"] for h in records]  # the dashboard's series, as it went
    assert teacher_paid == sorted(teacher_paid) and teacher_paid[-1] <= paid

    for h in records:
        # Each round is one engine call over exactly the consultations still open; finished
        # ones leave, so the batches shrink within a rollout (a refill starts another).
        assert h["engine_calls"] == h["open_consultations"]
        assert h["patient_requests"] >= 16 and h["doctor_turns"] >= h["consultations_kept"]
    # The silent case: its consultations break at the opening, its group is dropped whole and
    # another case's group takes its place in a second rollout of that iteration.
    broken = [h for h in records if h.get("consultations_patient_error")]
    assert broken and all(h["dropped_groups"] >= 1 for h in broken)
    assert all(h["consultations_patient_error"] % 4 == 0 for h in broken)
    assert broken[0]["open_consultations"][0] == 12 and 16 in broken[0]["open_consultations"]
    assert manifest["groups"] == ["patient", "policy", "reward", "reward_1", "rollout"]


def test_ppo_with_a_critic_trains_consultations_on_turn_level_rewards(
    cases: str, tiny_model_dir: str, tmp_path: Path, local_ray
) -> None:
    """PPO (GAE, a critic from the reward model) on consultations, the rule scoring each doctor
    turn on its own (``granularity: turn``): the critic's values and the advantages run over the
    doctor's tokens across the patient's turns, and every iteration's reward is the sum of its
    turns' scores (at most 1 per doctor turn: a question in that turn)."""
    from huatuo_ray.config import ModelConfig
    from huatuo_ray.inference.generation import EngineConfig
    from huatuo_ray.rlmf import ppo
    from huatuo_ray.rlmf.ppo_config import (
        ConsultationConfig,
        CriticConfig,
        RewardConfig,
        RolloutConfig,
    )
    from huatuo_ray.train.deepspeed_setup import DeepSpeedConfig, OptimConfig
    from tests.conftest import teacher_config
    from tests.rlmf.test_critic_free import SMALL
    from tests.rlmf.test_ppo import ppo_config
    from tests.support.target_reward import build_target_token_reward_model

    value_model = build_target_token_reward_model(str(tmp_path / "rm"), tiny_model_dir, 5)
    teacher = Teacher("no case is silent here")
    with ScriptedOpenAIServer(teacher, require_api_key=TEACHER_KEY) as server:
        out = tmp_path / "ppo-consult"
        config = ppo_config(
            (cases, value_model), tiny_model_dir, out, "hf", iterations=3, rollout_size=4,
            minibatch_size=4, micro_batch_size=4, weight_sync="object_store",
            reward=RewardConfig(kind="function", granularity="turn", resources=SMALL,
                                function="huatuo_ray.rlmf.consultation_rewards:asks_question_here"),
            critic=CriticConfig(model=ModelConfig(path=value_model), trainable_layers=None,
                                optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
                                deepspeed=DeepSpeedConfig(zero_stage=0, precision="fp32"),
                                resources=SMALL),
            rollout=RolloutConfig(
                engine=EngineConfig(backend="hf", max_model_len=1024, hf_batch_prompts=True),
                resources=SMALL, chunk_size=4, mode="consultation",
                consultation=ConsultationConfig(
                    patient=teacher_config(server.base_url, max_tokens=64, max_retries=1),
                    max_turns=2, max_tokens=512, max_parse_retries=1, resources=SMALL),
            ),
        )  # fmt: skip
        manifest = ppo.main(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert manifest["training"]["iterations"] == 3 and "critic" in manifest["groups"]
    for h in records:
        turns_per_consultation = h["doctor_turns"] / h["consultations_kept"]
        assert 0 <= h["reward_mean"] <= turns_per_consultation
        assert h["value_loss"] > 0 and h["engine_calls"] == h["open_consultations"]
