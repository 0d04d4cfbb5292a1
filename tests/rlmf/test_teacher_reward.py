"""The ``teacher`` reward kind: a loopback teacher (real HTTP, the appendix-B rating prompt) judges
the answers of each group in pairs, both orders; a run's reward rises, and a run stops cleanly
when its teacher budget is spent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from huatuo_ray.rlmf import ppo
from huatuo_ray.rlmf.ppo_config import RewardConfig
from huatuo_ray.rlmf.teacher_reward import TeacherBudget, TeacherRewardConfig, pairs_of_group
from tests.conftest import teacher_config
from tests.rlmf.test_critic_free import SMALL, assert_reward_rose, critic_free, history
from tests.rlmf.test_ppo import ppo_inputs  # noqa: F401 - the module's fixture
from tests.support.openai_servers import ScriptedOpenAIServer
from tests.support.rule_rewards import TARGET_WORD


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[-1].split(end, 1)[0]


def target_word_judge(body: dict) -> str:
    """Rates each response 1 + (occurrences of the target word, at most 9)."""
    prompt = body["messages"][-1]["content"]
    a = _between(prompt, "[Assistant A]", "[End of Assistant A]").count(TARGET_WORD)
    b = _between(prompt, "[Assistant B]", "[End of Assistant B]").count(TARGET_WORD)
    return f"Rating A: {1 + min(a, 9)}; Rating B: {1 + min(b, 9)}"


def teacher_reward(base_url: str, budget: TeacherBudget | None = None) -> RewardConfig:
    return RewardConfig(
        kind="teacher",
        teacher=TeacherRewardConfig(
            teacher=teacher_config(base_url, max_tokens=64, timeout_s=10.0),
            budget=budget or TeacherBudget(),
        ),
        resources=SMALL,
    )


def first_doctor_line(rating_prompt: str, tag: str) -> str:
    """The AI doctor's first line in the consultation under ``tag`` of a rating prompt ("" in
    the real doctor's consultation)."""
    block = rating_prompt.split(tag, 1)[1].split("[End of", 1)[0]
    return next((line for line in block.splitlines() if line.startswith("AI doctor:")), "")


def test_pairs_of_a_group_cover_every_answer() -> None:
    assert pairs_of_group(4) == [(0, 1), (2, 3)]
    assert pairs_of_group(3) == [(0, 1), (2, 0)]
    assert pairs_of_group(1) == []


@pytest.mark.slow
def test_teacher_reward_drives_a_run_and_its_budget_stops_one(
    ppo_inputs,  # noqa: F811
    tiny_model_dir: str,
    tmp_path: Path,
    local_ray,
) -> None:
    with ScriptedOpenAIServer(target_word_judge) as server:
        out = tmp_path / "teacher"
        manifest = ppo.main(
            critic_free(
                ppo_inputs, tiny_model_dir, out, "grpo", reward=teacher_reward(server.base_url)
            )
        )
        records = history(out)
        assert_reward_rose(records, 0.5)
        usage = manifest["teacher_usage"]["reward"]
        # 4 prompts x 2 pairs x 2 orders per iteration, less what the cache answered.
        assert usage["requests"] == 16 * 20 and usage["paid"] + usage["cached"] == 16 * 20
        assert manifest["stopped"] is None and server.stats.succeeded == usage["paid"]

        stopped = tmp_path / "teacher-budget"
        budget = TeacherBudget(max_requests=40)  # two iterations of 16, not a third
        manifest = ppo.main(
            critic_free(
                ppo_inputs,
                tiny_model_dir,
                stopped,
                "grpo",
                reward=teacher_reward(server.base_url, budget),
                iterations=10,
            )
        )
    assert manifest["stopped"] == "teacher budget spent"
    assert manifest["training"]["iterations"] == 2
    assert manifest["teacher_usage"]["reward"]["paid"] <= 40
    assert len(history(stopped)) == 2 and (stopped / "model.safetensors").exists()
    assert json.loads((stopped / "checkpoints" / "iter_000002" / "state.json").read_text())


def test_teacher_worker_rates_groups_in_both_orders_within_its_budget(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    from huatuo_ray.rlmf.experience import make_experience
    from huatuo_ray.rlmf.teacher_reward import TeacherRewardWorker
    from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV

    monkeypatch.setenv(TEACHER_KEY_ENV, TEACHER_KEY)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["的的的", "好", "的", "的的"]  # one group of 4: target words 3, 0, 1, 2
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    exp = make_experience([[5]] * 4, responses, [True] * 4, 0)
    turns = [{"role": "user", "content": "头痛"}]
    infos = [{"prompt": "头痛", "reference": "休息", "meta": {"turns": turns}}] * 4
    loop = asyncio.new_event_loop()  # one loop, as in the async actor

    def rate(*args):
        return loop.run_until_complete(worker.scores(*args))

    with ScriptedOpenAIServer(target_word_judge) as server:
        spec = teacher_reward(server.base_url, TeacherBudget(max_requests_per_iteration=6))
        worker = TeacherRewardWorker(spec.teacher, 4, -1.0, tiny_model_dir, str(tmp_path / "c"))
        scores, raw, unrated, spent = rate(exp, infos)
        # Pairs (0, 1) and (2, 3), each in both orders: 4 requests; rating = 1 + count.
        assert scores.tolist() == [4.0, 1.0, 2.0, 3.0] and (unrated, spent) == (0, False)
        assert server.stats.succeeded == 4
        # A second call in the same iteration would pass 6 requests: refused, nothing sent.
        _, _, _, spent = rate(exp, infos)
        assert spent and server.stats.succeeded == 4
        worker.begin_iteration()  # a new iteration: the same requests now come from the cache
        scores, _, _, spent = rate(exp, infos)
        assert not spent and scores.tolist() == [4.0, 1.0, 2.0, 3.0]
        assert server.stats.succeeded == 4 and worker.usage()["cached"] == 4
    loop.close()


def test_teacher_worker_rates_whole_consultations_of_a_case_in_both_orders(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consultation rows: each pair of a group's consultations is rated in both orders with the
    consultation rating prompt (the case, the real doctor's consultation, both transcripts);
    versus_doctor puts the real consultation in B's place."""
    from huatuo_ray.rlmf.experience import make_experience
    from huatuo_ray.rlmf.teacher_reward import TeacherRewardWorker
    from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV

    monkeypatch.setenv(TEACHER_KEY_ENV, TEACHER_KEY)
    firsts = ["哪里疼？", "多喝水。", "疼了几天？", "休息。"]

    def transcript(first: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": "我头痛"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "额头。"}, {"role": "assistant", "content": "的"}]  # fmt: skip

    infos = [{"prompt": "头痛三天", "reference": "Doctor: 哪里痛？",
              "meta": {"consultation": True, "case": "病例：头痛三天", "turns": transcript(f)}}
             for f in firsts]  # fmt: skip
    exp = make_experience([[5]] * 4, [[6, 7]] * 4, [True] * 4, 0)
    seen: list[str] = []

    def judge(body: dict) -> str:  # 8 for a doctor who asked first, 2 otherwise
        asked = body["messages"][-1]["content"]
        seen.append(asked)
        a, b = (first_doctor_line(asked, tag) for tag in ("[Assistant A]", "[Assistant B]"))
        return f"Rating A: {8 if '？' in a else 2}; Rating B: {8 if '？' in b else 2}"

    loop = asyncio.new_event_loop()
    with ScriptedOpenAIServer(judge) as server:
        spec = teacher_reward(server.base_url)
        worker = TeacherRewardWorker(spec.teacher, 4, -1.0, tiny_model_dir, str(tmp_path / "c"))
        scores, _, unrated, _ = loop.run_until_complete(worker.scores(exp, infos))
        assert scores.tolist() == [8.0, 2.0, 8.0, 2.0] and unrated == 0
        assert len(seen) == 4  # pairs (0, 1) and (2, 3), both orders
        pairs = {(first_doctor_line(x, "[Assistant A]"), first_doctor_line(x, "[Assistant B]"))
                 for x in seen}  # fmt: skip
        doctor = [f"AI doctor: {f}" for f in firsts]
        assert pairs == {(doctor[0], doctor[1]), (doctor[1], doctor[0]),
                         (doctor[2], doctor[3]), (doctor[3], doctor[2])}  # fmt: skip
        one = next(x for x in seen if first_doctor_line(x, "[Assistant A]") == doctor[0])
        assert "[Case]\n病例：头痛三天" in one and "Doctor: 哪里痛？" in one
        assert "[Assistant A]\nPatient: 我头痛\nAI doctor: 哪里疼？\nPatient: 额头。" in one

        spec.teacher.mode = "versus_doctor"
        worker = TeacherRewardWorker(spec.teacher, 4, -1.0, tiny_model_dir, str(tmp_path / "d"))
        loop.run_until_complete(worker.scores(exp, infos))
    loop.close()
    assert len(seen) == 8 and all("[Assistant B]\nDoctor: 哪里痛？" in s for s in seen[4:])
