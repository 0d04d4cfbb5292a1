"""A consultation as one RL sample (issue 24's first part): the training chat template's tokens,
the doctor's the only actions, and the RL math across the patient's turns, by hand."""

from __future__ import annotations

import pytest
import torch

from huatuo_ray.dialogue import (
    ASSISTANT_TAG,
    IGNORE_INDEX,
    USER_TAG,
    encode_text,
    tokenize_dialogue,
    turn,
)
from huatuo_ray.rlmf.advantages import discounted_returns
from huatuo_ray.rlmf.consultation import Transcript
from huatuo_ray.rlmf.experience import make_experience
from huatuo_ray.rlmf.ppo_math import gae, token_rewards

CONSULTATION = [
    turn("system", "你是一名医生。"),
    turn("user", "我头痛三天了。"),
    turn("assistant", "疼在哪里？"),
    turn("user", "额头，一跳一跳的。"),
    turn("assistant", "多休息，如加重请就医。"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_a_three_turn_consultation_is_the_training_templates_tokens_with_doctor_only_actions(
    tokenizer,
) -> None:
    t = Transcript.from_turns(tokenizer, CONSULTATION)
    eos = tokenizer.eos_token_id
    doctor = [encode_text(tokenizer, "疼在哪里？") + [eos],
              encode_text(tokenizer, "多休息，如加重请就医。") + [eos]]  # fmt: skip
    patient = encode_text(tokenizer, f"{USER_TAG}额头，一跳一跳的。 ") + encode_text(
        tokenizer, ASSISTANT_TAG
    )
    # The masked token count is exact: the doctor's two turns with their EOS, nothing else.
    assert t.doctor_tokens == len(doctor[0]) + len(doctor[1]) and t.doctor_turns == 2
    assert t.response == doctor[0] + patient + doctor[1]
    assert t.actions == [1] * len(doctor[0]) + [0] * len(patient) + [1] * len(doctor[1])
    # The same tokens as SFT trains on, and the actions exactly SFT's supervised positions.
    sft = tokenize_dialogue(tokenizer, CONSULTATION, max_length=4096)
    assert t.prompt + t.response == sft.input_ids
    supervised = [int(label != IGNORE_INDEX) for label in sft.labels]
    assert supervised == [0] * len(t.prompt) + t.actions
    # Built turn by turn, as a rollout does, it is the same sample; the engine's next prompt is
    # the whole consultation, ending in the assistant tag.
    live = Transcript.open(tokenizer, CONSULTATION[:2])
    live.add_doctor(doctor[0])
    live.add_patient(tokenizer, "额头，一跳一跳的。")
    assert live.next_prompt()[-len(encode_text(tokenizer, ASSISTANT_TAG)) :] == encode_text(
        tokenizer, ASSISTANT_TAG
    )
    live.add_doctor(doctor[1])
    assert (live.prompt, live.response, live.actions) == (t.prompt, t.response, t.actions)

    exp = make_experience([t.prompt], [t.response], [True], 0, action_masks=[t.actions])
    assert int(exp.action_mask.sum()) == t.doctor_tokens
    assert int(exp.attention_mask[:, exp.prompt_width :].sum()) == len(t.response)
    with pytest.raises(ValueError, match="action flags"):
        make_experience([t.prompt], [t.response], [True], 0, action_masks=[t.actions[:-1]])


# Doctor, doctor, patient, patient, doctor, then padding: the next action after t=1 is t=4.
GAPPED = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])


def test_rewards_returns_and_gae_skip_the_patients_turns_by_hand() -> None:
    kl = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3, 9.0]])
    rewards = token_rewards(torch.tensor([2.0]), kl, GAPPED, beta=0.5)
    # -beta * KL on the doctor's tokens, the score on the last doctor token (t=4).
    assert rewards.tolist()[0] == pytest.approx([-0.05, -0.1, 0.0, 0.0, -0.15 + 2.0, 0.0])
    # A row ending in a patient's turn: the score still goes on the doctor's last token.
    ended_by_patient = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    late = token_rewards(torch.tensor([1.0]), torch.zeros(1, 6), ended_by_patient, beta=0.0)
    assert late.tolist()[0] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]

    r = torch.tensor([[1.0, 2.0, 0.0, 0.0, 3.0, 0.0]])
    g = 0.9
    returns = discounted_returns(r, GAPPED, g)
    g4 = 3.0
    g1 = 2.0 + g * g4  # the patient's turn is not a step
    g0 = 1.0 + g * g1
    assert returns.tolist()[0] == pytest.approx([g0, g1, 0.0, 0.0, g4, 0.0])

    v = torch.tensor([[0.5, 0.25, 7.0, 7.0, 1.0, 7.0]])  # values under the gap are ignored
    lam = 0.5
    a4 = 3.0 + g * 0.0 - 1.0
    a1 = 2.0 + g * 1.0 - 0.25 + g * lam * a4  # bootstraps from t=4, not from t=2
    a0 = 1.0 + g * 0.25 - 0.5 + g * lam * a1
    advantages, value_targets = gae(r, v, GAPPED, g, lam)
    assert advantages.tolist()[0] == pytest.approx([a0, a1, 0.0, 0.0, a4, 0.0])
    assert value_targets.tolist()[0] == pytest.approx(
        [a0 + 0.5, a1 + 0.25, 0.0, 0.0, a4 + 1.0, 0.0]
    )


# ---------------------------------------------------------------- rollouts


def scripted_patient(body: dict) -> str:
    """A patient whose brief says when it leaves: ``leaves_after=K`` says goodbye once the doctor
    has spoken K times (0: never), ``silent`` answers nothing (unparseable: a failed patient)."""
    import re

    system = body["messages"][0]["content"]
    doctor_lines = sum(m["role"] == "user" for m in body["messages"]) - 1  # less the greeting
    if "silent" in system:
        return ""
    leaves = int(re.search(r"leaves_after=(\d+)", system)[1])
    if leaves and doctor_lines >= leaves:
        return "好的，谢谢医生，再见。"
    return f"我头痛，疼了{doctor_lines + 2}天了。"


def rollout_parts(tiny_model_dir: str, server_url: str, cache: str):
    """(doctor call recording its batch sizes, the batches, a PatientWorker actor's call)."""
    import ray

    from huatuo_ray.inference.generation import EngineConfig, SamplingConfig, make_generator
    from huatuo_ray.rlmf.actors.patient import PatientWorker
    from tests.conftest import teacher_config

    engine = make_generator(tiny_model_dir, EngineConfig(backend="hf"))
    sampling = SamplingConfig(n=1, max_new_tokens=8, temperature=1.0, top_p=1.0)
    batches: list[int] = []

    def doctor(prompts: list[list[int]], seeds: list[int]) -> list:
        batches.append(len(prompts))  # what the engine decodes at once
        return [s[0] for s in engine.generate(prompts, sampling, seeds, logprobs=True)]

    worker = (
        ray.remote(PatientWorker)
        .options(num_cpus=0.1)
        .remote(teacher_config(server_url, max_retries=1), cache, retries=1)
    )
    return doctor, batches, lambda requests: ray.get(worker.replies.remote(requests)), worker


def consultations_of(cases: dict[str, str], n: int) -> list:
    from huatuo_ray.rlmf.consultation import Consultation
    from huatuo_ray.teacher.prompts import patient_system_prompt

    return [
        Consultation(case, patient_system_prompt(f"病例{case}：头痛。{brief}"), seed=100 * i + k)
        for i, (case, brief) in enumerate(cases.items())
        for k in range(n)
    ]


CASES = {"A": "leaves_after=1", "B": "leaves_after=2", "C": "leaves_after=0", "D": "silent"}


@pytest.mark.slow
def test_open_consultations_decode_together_and_finished_ones_leave_the_batch(
    local_ray, tiny_model_dir: str, tokenizer, tmp_path
) -> None:
    """4 cases x 2 consultations, up to 3 doctor turns: D's patient fails at once (dropped), A's
    leaves after one doctor turn, B's after two, C's stays to the turn limit. Every round is one
    engine call over exactly the consultations still open; a rerun on the same cache replays
    every patient line (nothing paid twice) and, with the same seeds, the same consultations."""
    import ray

    from huatuo_ray.rlmf.consultation import run_consultations
    from tests.conftest import TEACHER_KEY
    from tests.support.openai_servers import ScriptedOpenAIServer

    cache = str(tmp_path / "patients")
    with ScriptedOpenAIServer(scripted_patient, require_api_key=TEACHER_KEY) as server:
        doctor, batches, patient, worker = rollout_parts(tiny_model_dir, server.base_url, cache)
        rollout = run_consultations(consultations_of(CASES, 2), tokenizer, doctor, patient,
                                    max_turns=3, max_tokens=1024, max_new_tokens=8)  # fmt: skip
        assert batches == rollout.engine_batches == [6, 4, 2]  # A's 2 leave, then B's 2
        assert {c.case_id: c.ended for c in rollout.kept} == {
            "A": "goodbye", "B": "goodbye", "C": "turn_limit"}  # fmt: skip
        assert len(rollout.kept) == 6 and rollout.dropped == {"patient_error": 2}
        # Patients asked: 8 openings, then after each doctor turn those not at the turn limit.
        assert rollout.patient_requests == 8 + 6 + 4 == 18
        for c in rollout.kept:
            t = c.transcript
            doctors = [m for m in c.turns if m["role"] == "assistant"]
            assert t.doctor_turns == len(doctors) == {"A": 1, "B": 2, "C": 3}[c.case_id]
            assert len(t.actions) == len(t.response) == len(t.logprobs)
            # Every doctor token is an action with the engine's log-prob; no patient token is.
            assert all((lp < 0) == bool(a) for lp, a in zip(t.logprobs, t.actions))
        paid = ray.get(worker.usage.remote())["paid"]
        answered = server.stats.succeeded
        assert paid == answered >= 18  # D's patients were asked again once

        doctor, batches, patient, worker = rollout_parts(tiny_model_dir, server.base_url, cache)
        again = run_consultations(consultations_of(CASES, 2), tokenizer, doctor, patient,
                                  max_turns=3, max_tokens=1024, max_new_tokens=8)  # fmt: skip
        usage = ray.get(worker.usage.remote())
        assert server.stats.succeeded == answered  # the rerun sent the teacher nothing
    assert usage["paid"] == 0 and usage["cached"] == paid
    assert again.dropped == rollout.dropped and batches == [6, 4, 2]
    assert [c.transcript.response for c in again.kept] == [
        c.transcript.response for c in rollout.kept]  # fmt: skip


@pytest.mark.slow
def test_a_consultation_that_would_pass_the_length_limit_is_dropped_with_its_reason(
    local_ray, tiny_model_dir: str, tokenizer, tmp_path
) -> None:
    from huatuo_ray.rlmf.consultation import run_consultations
    from tests.conftest import TEACHER_KEY
    from tests.support.openai_servers import ScriptedOpenAIServer

    with ScriptedOpenAIServer(scripted_patient, require_api_key=TEACHER_KEY) as server:
        doctor, batches, patient, _ = rollout_parts(tiny_model_dir, server.base_url,
                                                    str(tmp_path / "patients"))  # fmt: skip
        cases = consultations_of({"C": "leaves_after=0"}, 2)
        opening = run_consultations(cases, tokenizer, doctor, patient, max_turns=1,
                                    max_tokens=1024, max_new_tokens=8)  # fmt: skip
        first_turn = len(opening.kept[0].transcript.prompt) + 8
        # Room for the first doctor turn only: the second would pass the limit.
        rollout = run_consultations(consultations_of({"C": "leaves_after=0"}, 2), tokenizer,
                                    doctor, patient, max_turns=3, max_tokens=first_turn + 4,
                                    max_new_tokens=8)  # fmt: skip
    assert rollout.kept == [] and rollout.dropped == {"too_long": 2}
    assert rollout.engine_batches == [2]


def test_the_patients_budget_stops_a_rollout_before_the_round_that_would_pass_it(
    tokenizer,
) -> None:
    """A patient call answering None (the budget would be passed: nothing sent) ends the rollout
    there with nothing kept, whichever round it comes in."""
    from huatuo_ray.inference.generation import Sample
    from huatuo_ray.rlmf.consultation import Consultation, run_consultations

    def doctor(prompts, seeds):
        return [Sample([7, 8], "哪里疼？", True, [-1.0, -1.0]) for _ in prompts]

    def patients_paid_for(rounds: int):
        asked: list[int] = []

        def patient(requests):
            asked.append(len(requests))
            return ["头痛。"] * len(requests) if len(asked) <= rounds else None

        return patient

    for rounds_paid in (0, 1):
        patient = patients_paid_for(rounds_paid)

        cases = [Consultation("A", "brief", seed=k) for k in range(3)]
        rollout = run_consultations(cases, tokenizer, doctor, patient, max_turns=3,
                                    max_tokens=1024, max_new_tokens=8)  # fmt: skip
        assert rollout.budget_spent and rollout.kept == []
        assert rollout.patient_requests == 3 * rounds_paid  # only the rounds answered
        assert rollout.engine_batches == [3] * rounds_paid


def test_consultation_rewards_read_the_transcript() -> None:
    from huatuo_ray.rlmf.consultation_rewards import asks_first, no_certain_diagnosis

    def meta(*doctor: str) -> dict:
        turns = []
        for line in doctor:
            turns += [
                {"role": "user", "content": "我头痛。"},
                {"role": "assistant", "content": line},
            ]
        return {"turns": turns}

    assert asks_first("", "", "", meta("疼了多久了？", "多休息。")) == 1.0
    assert asks_first("", "", "", meta("您好，头痛是否伴有发热", "多休息。")) == 1.0
    assert asks_first("", "", "", meta("多休息。", "疼了几天？")) == 0.0  # asked too late
    assert asks_first("", "", "", {"turns": []}) == 0.0
    assert no_certain_diagnosis("", "", "", meta("可能是偏头痛，需要检查。")) == 0.0
    assert no_certain_diagnosis("", "", "", meta("哪里疼？", "这肯定是偏头痛。")) == -1.0


def test_cases_become_consultation_prompts_with_the_patients_brief(shared_datasets) -> None:
    """HuatuoGPT-II's evaluation cases (with real dialogues) through ``data``'s reader: one
    prompt per case, the consult stage's patient brief holding the case, the real consultation
    as the rater's reference; a record without a case is a counted reject."""
    from huatuo_ray.data.readers import meddialog_cases
    from huatuo_ray.dialogue import Dialogue
    from huatuo_ray.rlmf.rl_prompts import case_prompts
    from huatuo_ray.teacher.prompts import EVAL_PATIENT, PATIENT

    path = shared_datasets / "huatuogpt2_eval" / "huatuo100_conv" / "GPT4.json"
    records = [r for r in meddialog_cases.read(str(path)) if isinstance(r, Dialogue)][:3]
    records.append(Dialogue("no-case", "meddialog", [{"role": "user", "content": "?"}], {}))
    out = list(case_prompts(records))
    assert out[-1] == {"id": "no-case", "reason": "no case description for the patient"}
    case = next(c for c in out if c.id == "meddialog_cases-34287")
    meta = case.meta
    assert meta["consultation"] and meta["department"] == "妇科"
    assert meta["brief"].startswith(EVAL_PATIENT.template[:20]) and meta["case"] in meta["brief"]
    assert meta["reference"].startswith("Doctor: 看了您的病历资料")
    assert "\nPatient: 抗糖丸\n保健品\n" in meta["reference"]
    dialogues = next(iter(case_prompts(records[:1], "dialogues")))
    assert dialogues.meta["brief"].startswith(PATIENT.template[:20])


def test_turn_level_rewards_score_each_doctor_turn_on_its_last_token_by_hand(
    tiny_model_dir: str,
) -> None:
    """``granularity: turn``: the function scores each doctor turn with the consultation up to
    it; the score lands on the turn's last token, the other sources' on the last one, and GAE
    (gamma = lambda = 1, no values, no KL) credits each turn with what follows it."""
    import torch

    from huatuo_ray.rlmf import ppo, rewards
    from huatuo_ray.rlmf.experience import make_experience
    from huatuo_ray.rlmf.ppo_config import PPOConfig, RewardConfig, RolloutConfig

    # doctor 2 tokens | patient 2 (context) | doctor 3 tokens
    exp = make_experience([[5, 6]], [[7, 8, 9, 10, 11, 12, 13]], [True], 0,
                          action_masks=[[1, 1, 0, 0, 1, 1, 1]])  # fmt: skip
    turns = [{"role": "user", "content": "头痛"}, {"role": "assistant", "content": "多久了？"},
             {"role": "user", "content": "三天"}, {"role": "assistant", "content": "多休息。"}]  # fmt: skip
    info = {"prompt": "头痛", "reference": "", "meta": {"consultation": True, "turns": turns}}
    worker = rewards.FunctionRewardWorker(
        "tests.support.rule_rewards:turn_and_history", 0.0, tiny_model_dir, "turn"
    )
    scores, _, errors, spent, placed = worker.scores(exp, [info])
    # turn 0 sees 2 turns: 0 + 2; turn 1 sees 4: 10 + 4
    assert placed.tolist() == [[0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 14.0]]
    assert scores.tolist() == [16.0] and (errors, spent) == (0, False)

    conversation = (torch.tensor([3.0]), torch.tensor([3.0]))  # another source, per consultation
    total, _, _, _, turn_part = rewards.combine(
        {"reward": [conversation], "reward_1": [(scores, scores, 0, False, placed)]},
        {"reward": 1.0, "reward_1": 0.5},
    )
    assert total.tolist() == [3.0 + 8.0] and turn_part.tolist() == [[0, 1.0, 0, 0, 0, 0, 7.0]]

    config = PPOConfig(
        inputs=["x"], output="y", rollout_size=1, minibatch_size=1, micro_batch_size=1,
        rollout=RolloutConfig(chunk_size=1, mode="consultation"), gamma=1.0, lam=1.0,
        whiten_advantages=False,
        extra_rewards=[RewardConfig(kind="function", function="m:f", granularity="turn")],
    )  # fmt: skip
    exp.scores, exp.turn_rewards = total, turn_part
    exp.logprobs = exp.ref_logprobs = exp.values = torch.zeros(1, 7)
    ppo.add_rewards_and_advantages(exp, 0.0, config)
    # The conversation's 3 on the last token, the turns' 1 and 7 on theirs.
    assert exp.rewards.tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 10.0]]
    # The first turn is credited with its own score and all that follows; the second with its own.
    assert exp.advantages.tolist() == [[11.0, 11.0, 0.0, 0.0, 10.0, 10.0, 10.0]]

    # A score replaced (a cut consultation with unfinished_score) goes whole on the last token.
    config.reward.unfinished_score = -1.0
    exp.finished = torch.tensor([False])
    exp = ppo.final_scores(exp, config)
    assert exp.scores.tolist() == [-1.0] and exp.turn_rewards.abs().sum() == 0

    with pytest.raises(ValueError, match="granularity turn scores a consultation"):
        PPOConfig(inputs=["x"], output="y", rollout_size=1, minibatch_size=1,
                  micro_batch_size=1, rollout=RolloutConfig(chunk_size=1),
                  extra_rewards=[RewardConfig(kind="function", function="m:f",
                                              granularity="turn")])  # fmt: skip
