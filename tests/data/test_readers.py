"""The dataset readers: on the real samples in ../shared/datasets, and on broken copies."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from huatuo_ray.data.readers import READERS, SOURCE_HELP
from huatuo_ray.data.readers.base import Reject
from huatuo_ray.dialogue import Dialogue

NAMES = {
    "cmedqa2",
    "webmedqa",
    "huatuo26m",
    "huatuo_answers",
    "meddialog",
    "meddialog_cases",
    "kuake_qic",
    "cmd_csv",
    "jsonl",
    "parquet",
}


def run(source: str, path: Path | str) -> tuple[list[Dialogue], list[Reject]]:
    """All items of one reader, split into records and rejects; checks the rules common to all."""
    items = list(READERS[source](str(path)))
    records = [x for x in items if isinstance(x, Dialogue)]
    rejects = [x for x in items if isinstance(x, Reject)]
    assert len(records) + len(rejects) == len(items)
    for record in records:
        record.validate()
        assert all(t["content"] == t["content"].strip() for t in record.turns)
        if source not in ("jsonl", "parquet"):
            assert record.source == source and record.id.startswith(f"{source}-")
    assert len({r.id for r in records}) == len(records), "ids must be unique"
    for reject in rejects:
        assert re.fullmatch(r".+(:\d+|#\d+)", reject.where), reject.where
    return records, rejects


def by_id(records: list[Dialogue]) -> dict[str, Dialogue]:
    return {r.id: r for r in records}


def reasons(rejects: list[Reject]) -> dict[str, str]:
    return {r.where: r.reason for r in rejects}


def test_registry() -> None:
    assert set(READERS) == NAMES
    assert set(SOURCE_HELP) == NAMES
    assert all(isinstance(v, str) and v and "\n" not in v for v in SOURCE_HELP.values())


# --- meddialog -----------------------------------------------------------------------------------


def test_meddialog_raw_sample(shared_datasets: Path) -> None:
    path = shared_datasets / "covid_dialogue_zh" / "COVID-Dialogue-Dataset-Chinese.txt"
    blocks = re.split(r"^(?=id=\d+$)", path.read_text(encoding="utf-8"), flags=re.M)
    with_dialogue = [b for b in blocks if re.search(r"^Dialogue$", b, re.M)]
    records, rejects = run("meddialog", path)
    assert len(records) == len(with_dialogue) == 94
    assert rejects == []

    d = by_id(records)["meddialog-1248"]
    assert d.meta["url"] == "https://www.haodf.com/doctorteam/flow_team_6477106501.htm"
    assert (
        d.meta["faculty"]
        == "湖南省肿瘤医院  甲状腺外科  湖南省肿瘤医院  头颈外科  湖南省肿瘤医院  乳腺外科"
    )
    assert d.meta["description"]["疾病"] == "甲状腺乳头状癌"
    assert d.meta["description"]["过敏史"] == "无（2020-03-22填写）"
    assert d.meta["diagnosis"] is None
    # The dialogue starts with the doctor, so 病情描述 opens it as the patient's first turn.
    assert d.meta["description_as_first_turn"] is True
    assert d.turns[0] == {"role": "user", "content": d.meta["description"]["病情描述"]}
    assert d.turns[0]["content"].startswith("彭主任您好，我是岳阳市一医院的一名医生")
    assert d.turns[1] == {"role": "assistant", "content": "部做个增强CT："}
    # Three consecutive 病人： utterances become one turn.
    assert d.turns[6] == {
        "role": "user",
        "content": "颈部增强CT已完善。\n请问可以去您那做微创吗？\n？",
    }
    assert d.turns[-1] == {"role": "assistant", "content": "是的"}
    assert len(d.turns) == 10

    # Two Dialogue blocks (a Diagnosis block between them) are concatenated and merged.
    d = by_id(records)["meddialog-1264"]
    assert d.meta["diagnosis"].startswith("病情摘要及初步印象：慢性咳嗽\n总结建议： 新型冠状病毒")
    merged = d.turns[4]
    assert merged["role"] == "user"
    assert merged["content"].startswith("我和我老公都很焦虑")
    assert merged["content"].endswith("然后我朋友也是感冒状态 我觉得应该是被他父母传染了的")
    assert d.turns[-1] == {"role": "assistant", "content": "看看我建议治疗"}

    # Dialogues that start with the patient are kept as they are.
    d = by_id(records)["meddialog-1353"]
    assert d.meta["description_as_first_turn"] is False
    assert d.turns[0]["role"] == "user"
    roles = [t["role"] for t in d.turns]
    assert all(a != b for a, b in zip(roles, roles[1:], strict=False)), (
        "turns alternate after merging"
    )


def test_meddialog_preprocessed_sample(shared_datasets: Path) -> None:
    path = shared_datasets / "covid_dialogue_zh" / "test_data.json"
    records, rejects = run("meddialog", path)
    assert len(records) == 109 and rejects == []
    first = records[0]
    assert first.id == "meddialog-test_data-0"
    assert len(first.turns) == 10
    assert first.turns[1] == {"role": "assistant", "content": "部做个增强CT：。"}
    assert first.turns[6] == {
        "role": "user",
        "content": "颈部增强CT已完善。请问可以去您那做微创吗？？",
    }
    assert first.meta == {"file": "test_data.json", "index": 0}


def test_meddialog_folder_reads_both_formats(shared_datasets: Path) -> None:
    records, rejects = run("meddialog", shared_datasets / "covid_dialogue_zh")
    assert len(records) == 94 + 109 and rejects == []


RAW_BROKEN = """
id=1
https://example.org/1

Description
病情描述： 咳嗽三天

Dialogue
病人：
咳嗽怎么办
医生：
多喝水

id=2
https://example.org/2

Description
疾病： 发烧

id=3
https://example.org/3

Dialogue
病人：
在吗
病人：
有人吗

id=4
https://example.org/4

Description
疾病： 头痛

Dialogue
医生：
您好

id=5
https://example.org/5

Dialogue
你好
医生：
您好

id=1
https://example.org/1-again

Dialogue
病人：
重复
医生：
重复

id=7
https://example.org/7

Description
病情描述： 胃痛
很久了

Dialogue
医生：

医生：
哪里痛？
病人：
胃
"""


def test_meddialog_raw_rejects(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt"
    path.write_text(RAW_BROKEN, encoding="utf-8")
    records, rejects = run("meddialog", path)
    assert [r.id for r in records] == ["meddialog-1", "meddialog-7"]
    assert records[0].turns == [
        {"role": "user", "content": "咳嗽怎么办"},
        {"role": "assistant", "content": "多喝水"},
    ]
    # A multi-line Description value; the empty doctor utterance is skipped; a trailing patient
    # turn is kept.
    assert records[1].turns == [
        {"role": "user", "content": "胃痛\n很久了"},
        {"role": "assistant", "content": "哪里痛？"},
        {"role": "user", "content": "胃"},
    ]
    assert reasons(rejects) == {
        "broken.txt:14": "no Dialogue section",
        "broken.txt:20": "no doctor reply in the dialogue",
        "broken.txt:29": "dialogue starts with the doctor and there is no 病情描述",
        "broken.txt:39": "Dialogue: text before the first speaker line: '你好'",
        "broken.txt:47": "duplicate id=1 (first at broken.txt:2)",
    }


def test_meddialog_preprocessed_rejects(tmp_path: Path) -> None:
    data = [
        ["病人：头痛", "医生：多休息"],
        ["医生：你好", "病人：头痛"],
        ["病人：头痛", "护士：你好"],
        ["病人：头痛", "病人：很痛"],
        "not a list",
        [],
    ]
    (tmp_path / "x_data.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    records, rejects = run("meddialog", tmp_path / "x_data.json")
    assert [r.id for r in records] == ["meddialog-x_data-0"]
    assert reasons(rejects) == {
        "x_data.json#1": "dialogue starts with the doctor",
        "x_data.json#2": "utterance 1 does not start with 病人： or 医生：",
        "x_data.json#3": "no doctor reply in the dialogue",
        "x_data.json#4": "a dialogue must be a list of strings",
        "x_data.json#5": "empty dialogue",
    }


# --- meddialog_cases -----------------------------------------------------------------------------


def test_meddialog_cases_sample(shared_datasets: Path) -> None:
    path = shared_datasets / "huatuogpt_eval" / "Med-dialog_100.json"
    records, rejects = run("meddialog_cases", path)
    assert len(records) == 100 and rejects == []
    d = records[0]
    assert d.id == "meddialog_cases-62963"
    assert d.meta["case_id"] == 62963
    assert d.meta["department"] == "皮肤科"
    assert d.meta["medical_case"].startswith("疾病：\n指甲营养不良\n病情描述：\n发病两年了")
    assert (
        d.meta["doctor_diagnosis"]
        == "病情摘要及初步印象：\n甲营养不良\n总结建议：\n适量用药，注意观察，注意随访"
    )
    assert d.turns == [{"role": "user", "content": d.meta["medical_case"]}]
    assert "real_dialogue" not in d.meta


def test_meddialog_cases_conv(shared_datasets: Path) -> None:
    folder = shared_datasets / "huatuogpt2_eval" / "huatuo100_conv"
    records, rejects = run("meddialog_cases", folder / "GPT4.json")
    assert len(records) == 100 and rejects == []
    d = by_id(records)["meddialog_cases-34287"]
    assert d.meta["department"] == "妇科"
    assert d.meta["doctor_diagnosis"].startswith("病情摘要及初步印象：\n您这个月的月经量明显减少")
    real = d.meta["real_dialogue"]
    assert real[0]["role"] == "assistant"
    assert real[0]["content"].startswith("看了您的病历资料")
    assert real[3] == {"role": "user", "content": "抗糖丸\n保健品"}
    assert real[-1] == {"role": "assistant", "content": "不客气"}
    # The same 100 case ids are in Med-dialog_100.json, with the same case text.
    cases = by_id(
        run("meddialog_cases", folder.parents[1] / "huatuogpt_eval" / "Med-dialog_100.json")[0]
    )
    assert set(cases) == set(by_id(records))
    assert cases[d.id].meta["medical_case"] == d.meta["medical_case"]

    # A folder of both conv files: the second copy of each case is a duplicate.
    records, rejects = run("meddialog_cases", folder)
    assert len(records) == 100 and len(rejects) == 100
    assert all(r.reason.startswith("duplicate case id") for r in rejects)


def test_meddialog_cases_rejects(tmp_path: Path) -> None:
    cases = [
        {
            "id": 1,
            "medical_case": "病情描述：\n头痛",
            "doctor_diagnosis": "休息",
            "Department": "内科",
        },
        {"id": 2, "medical_case": "  ", "doctor_diagnosis": "休息", "Department": "内科"},
        {"id": 3, "medical_case": "头痛", "Department": "内科"},
        {"medical_case": "头痛", "doctor_diagnosis": "休息"},
        {"id": 5, "Description": "头痛", "Diagnosis and suggestions": "休息", "Real Dialogue": "x"},
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases, ensure_ascii=False), encoding="utf-8")
    records, rejects = run("meddialog_cases", tmp_path / "cases.json")
    assert [r.id for r in records] == ["meddialog_cases-1"]
    assert reasons(rejects) == {
        "cases.json#1": "missing or empty medical case",
        "cases.json#2": "missing or empty doctor diagnosis",
        "cases.json#3": "missing id",
        "cases.json#4": "Real Dialogue: text before the first speaker line: 'x'",
    }


# --- kuake_qic -----------------------------------------------------------------------------------


def test_kuake_qic_samples(shared_datasets: Path) -> None:
    folder = shared_datasets / "kuake_qic"
    records, rejects = run("kuake_qic", folder / "KUAKE-QIC_dev.json")
    assert len(records) == 300 and rejects == []
    assert records[0].id == "kuake_qic-dev-s4"
    assert records[0].turns == [
        {"role": "user", "content": "您好，请问一岁三个月的孩子可以服用复方锌布颗粒吗？"}
    ]
    assert records[0].meta == {"qid": "s4", "label": "其他", "split": "dev"}
    assert sum(r.meta["label"] == "治疗方案" for r in records) == 124

    records, rejects = run("kuake_qic", folder / "KUAKE-QIC_test.json")
    assert len(records) == 100 and rejects == []
    assert records[0].id == "kuake_qic-test-s22"
    assert records[0].turns[0]["content"] == "小儿推拿5步法流鼻涕图"
    assert all(r.meta["label"] is None for r in records)

    records, _ = run("kuake_qic", shared_datasets / "huatuogpt_eval" / "KUAKE-QIC_100.json")
    assert len(records) == 100
    assert records[0].id == "kuake_qic-KUAKE-QIC_100-s53"


def test_kuake_qic_rejects_and_uri(tmp_path: Path) -> None:
    rows = [
        {"id": "s1", "query": " 头痛怎么办 ", "label": "治疗方案"},
        {"id": "s2", "query": "", "label": "其他"},
        {"id": "s3", "query": "   "},
        {"query": "没有id"},
        {"id": "s1", "query": "重复"},
        ["not", "an", "object"],
    ]
    path = tmp_path / "KUAKE-QIC_train.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    records, rejects = run("kuake_qic", path.as_uri())  # a file:// URI goes through storage
    assert [(r.id, r.turns[0]["content"]) for r in records] == [
        ("kuake_qic-train-s1", "头痛怎么办")
    ]
    assert reasons(rejects) == {
        "KUAKE-QIC_train.json#1": "missing or empty query",
        "KUAKE-QIC_train.json#2": "missing or empty query",
        "KUAKE-QIC_train.json#3": "missing id",
        "KUAKE-QIC_train.json#4": "duplicate id s1 (first at KUAKE-QIC_train.json#0)",
        "KUAKE-QIC_train.json#5": "a row must be a JSON object",
    }


# --- cmd_csv -------------------------------------------------------------------------------------


def test_cmd_csv_sample(shared_datasets: Path) -> None:
    path = shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
    rows = list(csv.reader(io.StringIO(path.read_bytes().decode("gb18030"), newline="")))
    records, rejects = run("cmd_csv", path)
    assert len(records) == len(rows) - 1 == 400 and rejects == []
    d = records[0]
    assert d.id == "cmd_csv-内科5000-6000_sample400-2"
    assert d.meta == {"department": "心血管科", "title": "高血压患者能吃党参吗？"}
    assert d.turns[0] == {
        "role": "user",
        "content": "我有高血压这两天女婿来的时候给我拿了些党参泡水喝，您好高血压可以吃党参吗？",
    }
    assert d.turns[1]["role"] == "assistant"
    assert d.turns[1]["content"].startswith("高血压病人可以口服党参的。党参有降血脂，降血压的作用")
    assert d.turns[1]["content"].endswith("感谢您的进行咨询，期望我的解释对你有所帮助。")


def test_cmd_csv_rejects(tmp_path: Path) -> None:
    lines = [
        "department,title,ask,answer\n",
        "内科,头痛怎么办,我头痛两天了,多休息\n",  # line 2: fine
        "内科,咳嗽,BROKEN,多喝水\n",  # line 3: an invalid byte goes here
        '内科,发烧,"烧了\n三天",退烧药\n',  # lines 4-5: a quoted field with a newline
        "内科,胃痛怎么办,无,吃点胃药\n",  # line 6: ask 无 -> title
        "内科,腹泻,拉肚子,\n",  # line 7: empty answer
        "内科,多一列,问,答,多余\n",  # line 8: wrong column count
        "\n",  # line 9: blank, skipped
        "外科,,,换药\n",  # line 10: no ask, no title
    ]
    data = "".join(lines).encode("gb18030").replace(b"BROKEN", b"\xff\xfe\x81")
    path = tmp_path / "内科.csv"
    path.write_bytes(data)
    records, rejects = run("cmd_csv", path)
    assert [(r.id, r.turns[0]["content"], r.turns[1]["content"]) for r in records] == [
        ("cmd_csv-内科-2", "我头痛两天了", "多休息"),
        ("cmd_csv-内科-4", "烧了\n三天", "退烧药"),
        ("cmd_csv-内科-6", "胃痛怎么办", "吃点胃药"),
    ]
    assert reasons(rejects) == {
        "内科.csv:3": "undecodable bytes (not GB18030)",
        "内科.csv:7": "missing or empty answer",
        "内科.csv:8": "expected 4 columns, found 5",
        "内科.csv:10": "no ask and no title",
    }


def test_cmd_csv_bad_header(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_bytes("科室,标题\n内科,头痛\n".encode("gb18030"))
    with pytest.raises(ValueError, match="x.csv"):
        list(READERS["cmd_csv"](str(tmp_path / "x.csv")))


# --- cmedqa2 -------------------------------------------------------------------------------------


def candidate_rows(shared_datasets: Path, split: str) -> list[dict[str, str]]:
    text = (shared_datasets / "cmedqa2" / f"{split}_candidates.txt").read_text("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def cmedqa2_folder(shared_datasets: Path, tmp_path: Path, answers: str) -> tuple[Path, list[str]]:
    folder = tmp_path / "cmedqa2"
    folder.mkdir()
    sample = shared_datasets / "cmedqa2"
    for name in ("question.csv", "dev_candidates.txt", "test_candidates.txt"):
        shutil.copy(sample / name, folder / name)
    (folder / "answer.csv").write_text(answers, encoding="utf-8")
    qids = [r[0] for r in csv.reader(io.StringIO((sample / "question.csv").read_text("utf-8")))]
    return folder, qids[1:]


def test_cmedqa2(shared_datasets: Path, tmp_path: Path) -> None:
    # 65102009 and 44275784 are train questions (rows 1-2 of question.csv). The first dev question
    # gets one of its label-1 answers, plus an answer that is not a label-1 candidate.
    dev = candidate_rows(shared_datasets, "dev")
    dev_qid = dev[0]["question_id"]
    positives = [r["ans_id"] for r in dev if r["question_id"] == dev_qid and r["label"] == "1"]
    answers = (
        "question_id,content,ans_id\n"  # columns in another order than the release's
        "65102009,可能是感冒引起的，多喝水，注意休息,1\n"
        "65102009,建议查血常规,2\n"
        "44275784,,3\n"
        f"{dev_qid},这是正确答案,{positives[0]}\n"
        f"{dev_qid},这不是标注的答案,999999\n"
        "12345678,不存在的问题,4\n"
        "65102009,少了一列\n"
    )
    folder, qids = cmedqa2_folder(shared_datasets, tmp_path, answers)
    assert len(qids) == 190 and qids[:2] == ["65102009", "44275784"]
    records, rejects = run("cmedqa2", folder)
    assert [r.id for r in records] == [
        "cmedqa2-65102009-1",
        "cmedqa2-65102009-2",
        f"cmedqa2-{dev_qid}-{positives[0]}",
    ]
    first = records[0]
    assert first.turns == [
        {"role": "user", "content": "头痛恶心肌肉痛关节痛颈部淋巴结疼痛怎么回事啊"},
        {"role": "assistant", "content": "可能是感冒引起的，多喝水，注意休息"},
    ]
    assert first.meta == {"question_id": "65102009", "ans_id": "1", "split": "train"}
    assert records[2].meta["split"] == "dev"

    found = reasons(rejects)
    assert found["answer.csv:7"] == "question_id 12345678 not in question.csv"
    assert found["answer.csv:8"] == "expected 3 columns, found 2"
    assert (
        found["answer.csv:6"]
        == f"answer 999999 of dev question {dev_qid} is not a label-1 candidate"
    )
    assert found["answer.csv:4"] == "empty content for ans_id 3"
    assert found["question.csv:4"] == "no answer for question_id 42163349 in answer.csv"
    # Every other label-1 candidate points to an answer that answer.csv lacks.
    labelled = [r for r in dev + candidate_rows(shared_datasets, "test") if r["label"] == "1"]
    missing = [r for r in rejects if re.match(r"ans_id \d+ \(label 1 for question", r.reason)]
    assert len(missing) == len(labelled) - 1
    no_answer = [r for r in rejects if r.reason.startswith("no answer for question_id")]
    assert len(no_answer) == 190 - 14 - 2  # train questions, less the two with answers
    assert len(rejects) == 4 + len(missing) + len(no_answer)


def test_cmedqa2_missing_answer_csv(shared_datasets: Path, tmp_path: Path) -> None:
    folder, _ = cmedqa2_folder(shared_datasets, tmp_path, "")
    (folder / "answer.csv").unlink()
    with pytest.raises(FileNotFoundError, match="answer.csv"):
        list(READERS["cmedqa2"](str(folder)))


def test_cmedqa2_bad_candidates(shared_datasets: Path, tmp_path: Path) -> None:
    folder, _ = cmedqa2_folder(shared_datasets, tmp_path, "ans_id,question_id,content\n")
    text = (folder / "dev_candidates.txt").read_text("utf-8").splitlines()
    text[1] = text[1].rsplit(",", 1)[0] + ",x"
    text.append("11111111,5,0,1")  # a question that is not in question.csv
    (folder / "dev_candidates.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    _, rejects = run("cmedqa2", folder)
    found = reasons(rejects)
    assert found["dev_candidates.txt:2"] == "bad label 'x'"
    assert (
        found[f"dev_candidates.txt:{len(text)}"]
        == "candidates for question_id 11111111 not in question.csv"
    )


# --- webmedqa (no sample: files written in the documented format) --------------------------------


def test_webmedqa(tmp_path: Path) -> None:
    rows = [
        "内科\t1\t101\t头痛怎么办？\t多休息，必要时吃止痛药。",
        "内科\t0\t101\t头痛怎么办？\t去买彩票。",
        "",
        "外科\t1\t102\t伤口发炎了\t请及时换药。",
        "外科\t2\t103\t问题\t答案",
        "外科\t1\t104\t少一列",
        "儿科\t1\t105\t\t没有问题",
        "外科\t1\t102\t伤口发炎了\t第二个正确答案。",
    ]
    (tmp_path / "medQA.train.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "medQA.valid.txt").write_bytes("内科\t1\t9\t咳嗽\t多喝水\n".encode() + b"\xff\n")
    records, rejects = run("webmedqa", tmp_path)
    assert [r.id for r in records] == [
        "webmedqa-train-101",
        "webmedqa-train-102",
        "webmedqa-train-102-2",
        "webmedqa-valid-9",
    ]
    assert records[0].turns == [
        {"role": "user", "content": "头痛怎么办？"},
        {"role": "assistant", "content": "多休息，必要时吃止痛药。"},
    ]
    assert records[0].meta == {"department": "内科", "split": "train", "qid": "101"}
    assert reasons(rejects) == {
        "medQA.train.txt:2": "negative candidate (label 0)",
        "medQA.train.txt:5": "bad label '2' (expected 1 or 0)",
        "medQA.train.txt:6": "expected 5 tab-separated columns, found 4",
        "medQA.train.txt:7": "empty question",
        "medQA.valid.txt:2": "line is not UTF-8",
    }


# --- huatuo26m (no sample: a file written in the documented format) -------------------------------


def test_huatuo26m(tmp_path: Path) -> None:
    rows = [
        {"questions": ["头痛怎么办？", "头疼如何缓解？"], "answers": ["多休息。", "吃止痛药。"]},
        {"questions": " 咳嗽吃什么药 ", "answers": "止咳糖浆。", "id": 7},
        '{"questions": "broken',
        {"questions": ["发烧"]},
        {"questions": [""], "answers": ["a"]},
        {"questions": [1, 2], "answers": ["a"]},
        {"questions": "x", "answers": "y", "id": 7},
        [1, 2],
    ]
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    (tmp_path / "test_datasets.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, rejects = run("huatuo26m", tmp_path / "test_datasets.jsonl")
    assert [r.id for r in records] == ["huatuo26m-test_datasets-1", "huatuo26m-7"]
    assert records[0].turns == [
        {"role": "user", "content": "头痛怎么办？"},
        {"role": "assistant", "content": "多休息。"},
    ]
    assert records[0].meta == {
        "extra_questions": ["头疼如何缓解？"],
        "extra_answers": ["吃止痛药。"],
    }
    assert records[1].turns[0]["content"] == "咳嗽吃什么药"
    assert records[1].meta["qid"] == 7
    found = reasons(rejects)
    assert found["test_datasets.jsonl:3"].startswith("bad JSON")
    assert found["test_datasets.jsonl:4"] == "missing or empty answers"
    assert found["test_datasets.jsonl:5"] == "missing or empty questions"
    assert found["test_datasets.jsonl:6"] == "questions must be a string or a list of strings"
    assert found["test_datasets.jsonl:7"].startswith("duplicate id huatuo26m-7")
    assert found["test_datasets.jsonl:8"] == "a line must be a JSON object"
    assert len(found) == 6


# --- generic jsonl / parquet ---------------------------------------------------------------------


GENERIC = [
    {
        "id": "a",
        "source": "demo",
        "turns": [{"role": "user", "content": " 你好 "}, {"role": "assistant", "content": "您好"}],
        "meta": {"k": 1},
    },
    {
        "messages": [
            {"role": "system", "content": "你是医生"},
            {"role": "user", "content": "头痛", "name": "p"},
            {"role": "assistant", "content": "休息"},
        ]
    },
    {"id": "c", "turns": [{"role": "doctor", "content": "x"}]},
    {"id": "d", "turns": [{"role": "user", "content": "  "}]},
    {"id": "e", "source": "demo"},
    {"id": "a", "turns": [{"role": "user", "content": "重复"}]},
    {"id": "f", "turns": [{"role": "user", "content": "x"}], "meta": "[1]"},
]


def test_jsonl(tmp_path: Path) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in GENERIC] + ["{broken"]
    (tmp_path / "mix.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, rejects = run("jsonl", tmp_path / "mix.jsonl")
    assert [(r.id, r.source) for r in records] == [("a", "demo"), ("mix.jsonl-2", "jsonl")]
    assert records[0].turns[0] == {"role": "user", "content": "你好"}
    assert records[0].meta == {"k": 1}
    assert [t["role"] for t in records[1].turns] == ["system", "user", "assistant"]
    assert records[1].turns[1] == {"role": "user", "content": "头痛"}
    found = reasons(rejects)
    assert found["mix.jsonl:3"] == "turn 0 has unknown role 'doctor'"
    assert found["mix.jsonl:4"] == "turn 0 (user) is empty"
    assert found["mix.jsonl:5"] == "no turns or messages"
    assert found["mix.jsonl:6"] == "duplicate id a (first at mix.jsonl:1)"
    assert found["mix.jsonl:7"] == "meta must be an object"
    assert found["mix.jsonl:8"].startswith("Expecting property name")
    assert len(found) == 6


def test_parquet_round_trip(tmp_path: Path) -> None:
    good = [
        Dialogue("p-1", "demo", [{"role": "user", "content": "头痛"}], {"n": 1}),
        Dialogue(
            "",
            "demo",
            [{"role": "user", "content": "咳嗽"}, {"role": "assistant", "content": "喝水"}],
        ),
        Dialogue("p-3", "demo", [{"role": "user", "content": " "}]),
    ]
    pq.write_table(pa.Table.from_pylist([d.to_row() for d in good]), tmp_path / "part-0.parquet")
    records, rejects = run("parquet", tmp_path)
    assert [r.id for r in records] == ["p-1", "part-0.parquet-1"]
    assert records[0] == good[0]
    assert records[1].turns == good[1].turns
    assert reasons(rejects) == {"part-0.parquet#2": "turn 0 (user) is empty"}


# --- huatuo_answers ------------------------------------------------------------------------------


def test_huatuo_answers_reads_stored_model_outputs(shared_datasets: Path, tmp_path: Path) -> None:
    inst = shared_datasets / "huatuogpt2_eval" / "huatuo100_inst"
    records = [r for r in READERS["huatuo_answers"](str(inst)) if not isinstance(r, Reject)]
    assert len(records) == 200  # 100 answers each from GPT-4 and HuatuoGPT2-7B
    first = records[0]
    assert [t["role"] for t in first.turns] == ["user", "assistant"]
    assert first.meta["model"] in {"GPT4", "HuatuoGPT2-7B"} and first.meta["label"]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "s1", "query": "头痛？"}, {"id": "s1", "query": "q", "model_output": "a"},'
                      ' {"id": "s1", "query": "q", "model_output": "b"}, 3]')  # fmt: skip
    rows = list(READERS["huatuo_answers"](str(broken)))
    reasons = [r.reason for r in rows if isinstance(r, Reject)]
    assert len(rows) == 4 and len(reasons) == 3
    assert "missing id, query or model_output" in reasons[0] and "duplicate" in reasons[1]
