"""RL on whole consultations (issue 24) end to end: real cases (HuatuoGPT-II's evaluation cases,
with their real dialogues) read by ``data``, the tiny policy as the doctor on HF rollouts, a
loopback teacher (real HTTP) as the patients and the rater. One GRPO run on a local Ray shows
the reward for asking a question in the first doctor turn rising, the engine's batch following
the open consultations, a broken case's group dropped and refilled, and the patients' budget
stopping the run cleanly with a checkpoint. ``jobs/tiny/grpo.consult.yaml``, killed next to the
tests' `ray start` head and rerun, sends the teacher no request twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from huatuo_ray.data.convert import DataConfig, convert
from huatuo_ray.rlmf import ppo
from huatuo_ray.rlmf.consultation_rewards import asks_question
from huatuo_ray.rlmf.ppo_config import ConsultationConfig, RewardConfig, RolloutConfig
from huatuo_ray.rlmf.teacher_reward import TeacherBudget
from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV, ClusterHead, teacher_config
from tests.rlmf.test_critic_free import SMALL, assert_reward_rose, critic_free, history
from tests.rlmf.test_teacher_reward import first_doctor_line
from tests.support.crash import kill_when
from tests.support.openai_servers import ScriptedOpenAIServer

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


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


class Patients:
    """The scripted patients: one line per request; a patient whose seed is even leaves after
    the doctor's first turn, an odd one stays; the case holding ``silent`` never answers
    (unparseable: its consultations break). Every request body is remembered."""

    def __init__(self, silent: str):
        self.silent = silent[:40]
        self.bodies: list[str] = []

    def __call__(self, body: dict) -> str:
        self.bodies.append(json.dumps(body, sort_keys=True, ensure_ascii=False))
        asked = body["messages"][-1]["content"]
        if "[Assistant A]" in asked:  # the rater: the consultation whose doctor asked first wins
            a, b = (first_doctor_line(asked, tag) for tag in ("[Assistant A]", "[Assistant B]"))
            return f"Rating A: {5 + 3 * asks_question(a)}; Rating B: {5 + 3 * asks_question(b)}"
        system = body["messages"][0]["content"]
        if self.silent in system:
            return ""
        doctor_lines = sum(m["role"] == "user" for m in body["messages"]) - 1  # less the greeting
        if doctor_lines >= 1 and body.get("seed", 0) % 2 == 0:
            return "好的，谢谢医生，再见。"
        return f"医生，我这个情况有{doctor_lines + 2}天了。"


def consultation_rollout(base_url: str, **overrides) -> RolloutConfig:
    from huatuo_ray.inference.generation import EngineConfig

    return RolloutConfig(
        engine=EngineConfig(backend="hf", max_model_len=1024, hf_batch_prompts=True),
        resources=SMALL,
        chunk_size=8,
        mode="consultation",
        consultation=ConsultationConfig(
            patient=teacher_config(base_url, max_tokens=64, max_retries=1),
            max_turns=2,
            max_tokens=512,
            max_parse_retries=1,
            resources=SMALL,
            **overrides,
        ),
    )


def test_consultation_grpo_learns_to_ask_first_and_stops_at_the_patients_budget(
    cases: str, tiny_model_dir: str, tmp_path: Path, local_ray
) -> None:
    patients = Patients(first_case_text(cases))
    reward = RewardConfig(
        kind="function",
        function="huatuo_ray.rlmf.consultation_rewards:asks_first",
        resources=SMALL,
    )
    budget = 600  # patient requests: about 14 iterations of 16 consultations, not 20
    with ScriptedOpenAIServer(patients, require_api_key=TEACHER_KEY) as server:
        out = tmp_path / "consult-rl"
        config = critic_free(
            (cases, ""), tiny_model_dir, out, "grpo", reward=reward,
            rollout=consultation_rollout(server.base_url, budget=TeacherBudget(max_requests=budget)),
        )  # fmt: skip
        manifest = ppo.main(config)
        succeeded = server.stats.succeeded
    records = history(out)
    assert_reward_rose(records, 0.4)  # from about 1 in 16 asking first
    # The budget stopped it: cleanly, between iterations, with a checkpoint and the final model.
    done = manifest["training"]["iterations"]
    assert manifest["stopped"] == "patient budget spent" and 8 <= done < 20
    assert len(records) == done and (out / "model.safetensors").exists()
    state = json.loads((out / "checkpoints" / f"iter_{done:06d}" / "state.json").read_text())
    assert state["iteration"] == done
    usage = manifest["teacher_usage"]["patient"]
    assert usage["paid"] == succeeded <= budget
    # Counted as it went (the dashboard's teacher series): all but the stopped rollout's.
    paid = [h["teacher_paid"] for h in records]
    assert paid == sorted(paid) and 0 < paid[-1] < usage["paid"]
    assert len(set(patients.bodies)) == len(patients.bodies)  # no request sent twice
    for h in records:
        # Each round is one engine call over exactly the consultations still open, and the
        # finished ones leave: the batches shrink within a rollout (a refill starts another).
        assert h["engine_calls"] == h["open_consultations"]
        assert h["patient_requests"] >= 16 and h["doctor_turns"] >= h["consultations_kept"]
    # The silent case: its consultations break at the opening, its group is dropped whole and
    # another case's group takes its place (a second rollout in that iteration).
    broken = [h for h in records if h.get("consultations_patient_error")]
    assert broken and all(h["dropped_groups"] >= 1 for h in broken)
    assert all(h["consultations_patient_error"] % 4 == 0 for h in broken)
    refilled = broken[0]["open_consultations"]
    assert refilled[0] == 12 and 16 in refilled  # 3 whole groups open, then a new rollout
    assert manifest["groups"] == ["patient", "policy", "reward", "rollout"]


def test_killed_consultation_rl_job_reruns_without_paying_the_teacher_twice(
    cases: str, tiny_model_dir: str, tmp_path: Path, cluster_head: ClusterHead
) -> None:
    """jobs/tiny/grpo.consult.yaml (patients and pairwise ratings from the teacher, a rule on the
    first doctor turn) killed after its iteration-2 checkpoint and one more iteration, then
    rerun: the redone iteration replays its patients' lines and ratings from the cache, draws
    the same consultations, and no request reaches the teacher twice."""
    patients = Patients(first_case_text(cases))
    out = tmp_path / "consult-rl-killed"
    with ScriptedOpenAIServer(patients, require_api_key=TEACHER_KEY) as server:
        endpoint = [f"base_url={server.base_url}", "model=scripted-teacher",
                    f"api_key_env={TEACHER_KEY_ENV}", "structured_outputs=false"]  # fmt: skip
        cmd = [
            sys.executable, "-m", "huatuo_ray", "grpo", "--config",
            str(REPO / "jobs/tiny/grpo.consult.yaml"), f"inputs=[{cases}]", f"output={out}",
            f"model.path={tiny_model_dir}", "iterations=4",
            *(f"rollout.consultation.patient.{o}" for o in endpoint),
            *(f"reward.teacher.teacher.{o}" for o in endpoint),
        ]  # fmt: skip
        env = cluster_head.stage_env()
        latest, metrics = out / "checkpoints" / "latest", out / "metrics.jsonl"
        kill_when(cmd, REPO, env, poll_s=0.2, ready=lambda: (
            latest.exists() and len(metrics.read_text().splitlines()) >= 3))  # fmt: skip
        killed = [json.loads(line) for line in metrics.read_text().splitlines()]
        sent_before = len(patients.bodies)
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["restarts"] == [2]
    usage = manifest["teacher_usage"]
    # The rerun's iteration 3 came from the cache: patients and ratings alike.
    assert usage["patient"]["cached"] > 0 and usage["reward"]["cached"] > 0
    assert len(patients.bodies) > sent_before  # iteration 4 was new
    assert len(set(patients.bodies)) == len(patients.bodies)  # nothing was paid for twice
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]
    before = killed[2]
    for key in ("reward_mean", "patient_requests", "doctor_turns", "response_length"):
        assert history[2][key] == pytest.approx(before[key], rel=1e-4, abs=1e-5), key
