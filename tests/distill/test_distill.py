"""Stages dialogues, self-instruct and mixture on real samples, through a faulty teacher proxy."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from huatuo_ray import artifacts
from huatuo_ray.data.convert import DataConfig, convert
from huatuo_ray.data.similarity import normalise, rouge_l
from huatuo_ray.dialogue import Dialogue, turn
from huatuo_ray.distill import dialogues, mixture, self_instruct
from huatuo_ray.teacher.prompts import DOCTOR, PATIENT
from huatuo_ray.teacher.stage import WorkersConfig
from tests.conftest import TEACHER_KEY, teacher_config

pytestmark = pytest.mark.slow


def test_dialogues_agents_keep_their_secrets(
    local_ray, faulty_teacher, tmp_path: Path, shared_datasets: Path
) -> None:
    server, proxy, responder = faulty_teacher
    cases = str(tmp_path / "cases")
    convert(
        DataConfig(
            source="meddialog_cases",
            input=str(shared_datasets / "huatuogpt_eval" / "Med-dialog_100.json"),
            output=cases,
            limit=12,
        )
    )
    out = str(tmp_path / "dialogues")
    manifest = dialogues.main(
        dialogues.DialoguesConfig(
            input=cases,
            output=out,
            max_turns=4,
            teacher=teacher_config(proxy.base_url),
            workers=WorkersConfig(num_workers=2, batch_size=4),
        )
    )
    records = artifacts.read_dialogues(out)
    assert manifest["rows"] == 12 and manifest["rejects"]["count"] == 0
    assert manifest["ended"] == {"goodbye": 12}  # the scripted patient leaves after two questions
    assert set(proxy.stats.delivered_ok_by_key.values()) == {1}
    for record in records:
        assert [t["role"] for t in record.turns] == ["user", "assistant"] * 2
        assert record.source == "distilled_dialogue"

    # Private inputs: the doctor never sees the case, the patient never sees the diagnosis.
    case_records = {d.id: d for d in artifacts.read_dialogues(cases)}
    patient_head = PATIENT.template.split("$")[0][:20]
    doctor_head = DOCTOR.template.split("$")[0][:20]
    seen_patient = seen_doctor = 0
    for body in responder.bodies:
        system = body["messages"][0]["content"]
        everything = "\n".join(m["content"] for m in body["messages"])
        for case in case_records.values():
            medical_case, diagnosis = case.meta["medical_case"], case.meta["doctor_diagnosis"]
            if system.startswith(patient_head) and medical_case in system:
                seen_patient += 1
                assert diagnosis not in everything
            if system.startswith(doctor_head) and diagnosis in system:
                seen_doctor += 1
                assert medical_case not in everything
    assert seen_patient >= 12 * 3 and seen_doctor >= 12 * 2


def test_self_instruct_filters_near_duplicates_and_resumes_free(
    local_ray, faulty_teacher, tmp_path: Path
) -> None:
    server, proxy, _ = faulty_teacher
    config = self_instruct.SelfInstructConfig(
        output=str(tmp_path / "si"),
        num_instructions=25,
        requests_per_round=3,
        max_rounds=8,
        teacher=teacher_config(proxy.base_url),
        workers=WorkersConfig(num_workers=2, batch_size=8),
    )
    manifest = self_instruct.main(config)
    gen = manifest["generation"]
    assert gen["triplets"] == gen["kept"] + gen["near_duplicates"] + gen["surplus"]
    assert gen["near_duplicates"] > 0 and gen["kept"] >= 10
    assert manifest["rows"] + manifest["rejects"]["count"] == gen["kept"]
    records = artifacts.read_dialogues(config.output)
    questions = [normalise(r.turns[0]["content"]) for r in records]
    assert max(rouge_l(a, b) for a, b in itertools.combinations(questions, 2)) < 0.7
    seeds = self_instruct.load_seeds(config.seeds)
    assert len(seeds) >= 50
    for record in records:
        assert record.meta["role"] and record.turns[1]["role"] == "assistant"

    # A rerun (overwrite) asks exactly the same questions: all answers come from the cache.
    paid = proxy.stats.delivered_ok
    config.overwrite = True
    again = self_instruct.main(config)
    assert proxy.stats.delivered_ok == paid
    assert again["teacher"]["usage"]["paid"] == 0
    assert [r.to_row() for r in artifacts.read_dialogues(config.output)] == [
        r.to_row() for r in records
    ]
    for path in Path(config.output).rglob("*"):
        if path.is_file():
            assert TEACHER_KEY not in path.read_text(errors="ignore")


def qa(
    id_: str, question: str, answer: str = "请多喝水，注意休息。", source: str = "t"
) -> Dialogue:
    return Dialogue(id_, source, [turn("user", question), turn("assistant", answer)])


def test_mixture_dedupes_decontaminates_and_splits(
    local_ray, tmp_path: Path, shared_datasets: Path
) -> None:
    real = str(tmp_path / "cmd")
    convert(
        DataConfig(
            source="cmd_csv",
            input=str(
                shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
            ),
            output=real,
            limit=160,
        )
    )
    eval_set = str(tmp_path / "kuake")
    convert(
        DataConfig(
            source="kuake_qic",
            input=str(shared_datasets / "huatuogpt_eval" / "KUAKE-QIC_100.json"),
            output=eval_set,
        )
    )
    eval_questions = [d.turns[0]["content"] for d in artifacts.read_dialogues(eval_set)]
    everything = artifacts.read_dialogues(real)
    artifacts.write_all(real, everything[:120], "test", {})  # the first 120 are the real source
    real_records, fresh_records = everything[:120], everything[120:160]
    other = str(tmp_path / "other")
    artifacts.write_all(
        other,
        [
            Dialogue("copy-0", "t", real_records[0].turns),  # exact duplicate of a real record
            qa("contaminated-0", eval_questions[0]),
            qa(
                "contaminated-1", " " + eval_questions[1].replace("？", "?") + " "
            ),  # same after normalising
            qa("near-eval-0", eval_questions[2] + "谢谢"),  # a near duplicate of an eval question
            qa("near-0", real_records[1].turns[0]["content"] + "啊", "另一个回答。"),
        ]
        + [Dialogue(f"fresh-{i}", "t", d.turns) for i, d in enumerate(fresh_records)],
        "test",
        {},
    )
    out = tmp_path / "mix"
    manifest = mixture.main(
        mixture.MixtureConfig(
            output=str(out),
            sources=[mixture.MixtureSource(real, 1.0), mixture.MixtureSource(other, 0.5)],
            eval_sets=[eval_set],
            validation_fraction=0.2,
        )
    )
    crafted = manifest["per_source"][other]
    assert crafted["in"] == 45
    assert crafted["question in an evaluation set"] == 2
    assert crafted["near duplicate of an evaluation question"] == 1
    reasons = {r["where"]: r["reason"] for r in artifacts.read_rejects(str(out))}
    assert reasons["copy-0"] == "exact duplicate"
    assert reasons["contaminated-0"] == reasons["contaminated-1"] == "question in an evaluation set"
    assert reasons["near-eval-0"] == "near duplicate of an evaluation question"
    assert reasons["near-0"] == "near duplicate question"
    # The real data has repeats of its own (the CSV repeats some rows): counted, not hidden.
    totals: dict[str, int] = {}
    for counts in manifest["per_source"].values():
        for k, v in counts.items():
            if k not in ("in", "train", "validation", "sampled_out"):
                totals[k] = totals.get(k, 0) + v
    assert manifest["rejects"]["by_reason"] == totals
    assert len(artifacts.read_rejects(str(out))) == sum(totals.values())
    for counts in manifest["per_source"].values():
        removed = sum(v for k, v in counts.items() if k not in ("in", "train", "validation"))
        assert counts["in"] == counts["train"] + counts["validation"] + removed
    fresh = manifest["per_source"][other]
    assert 8 <= fresh["sampled_out"] <= 32  # ratio 0.5 of 40 fresh records, seeded
    train = artifacts.read_dialogues(str(out / "train"))
    validation = artifacts.read_dialogues(str(out / "validation"))
    assert manifest["splits"] == {"train": len(train), "validation": len(validation)}
    assert 0.1 < len(validation) / (len(train) + len(validation)) < 0.3
    kept_questions = {normalise(d.turns[0]["content"]) for d in train + validation}
    assert not kept_questions & {normalise(q) for q in eval_questions}
    # Stable: the same config gives the same split.
    again = mixture.mix(
        mixture.MixtureConfig(
            output=str(tmp_path / "mix2"),
            sources=[mixture.MixtureSource(real, 1.0), mixture.MixtureSource(other, 0.5)],
            eval_sets=[eval_set],
            validation_fraction=0.2,
        )
    )
    assert again["splits"] == manifest["splits"]
