"""The paper's prompts and the parsers of teacher answers, on hand-made answers."""

from __future__ import annotations

import re

import pytest

from huatuo_ray.dialogue import turn
from huatuo_ray.teacher import prompts as P
from huatuo_ray.teacher.parsers import (
    RATING_REGEX,
    VERDICT_CHOICES,
    ParseError,
    Triplet,
    is_goodbye,
    parse_answer,
    parse_polished_dialogue,
    parse_rating,
    parse_triplets,
    parse_verdict,
)

CASE = "病情描述：\n咳嗽两周，夜间加重，无发热。"
DIAGNOSIS = "病情摘要及初步印象：\n咳嗽变异性哮喘可能。\n总结建议：\n肺功能检查。"
DIALOGUE = [
    turn("user", "医生您好，我咳嗽两周了。"),
    turn("assistant", "您好，咳嗽有痰吗？\n晚上会加重吗？"),
    turn("user", "没有痰，晚上比较厉害。"),
    turn("assistant", "建议做肺功能检查。"),
]
SEEDS = [
    Triplet("呼吸内科医生", "请解释下面这个检查结果。", "胸部CT示右肺下叶磨玻璃结节，直径6mm。"),
    Triplet("药剂师", "列出某种药物的主要禁忌症。", ""),
]


def content(messages: list[dict[str, str]]) -> str:
    assert [m["role"] for m in messages] == ["user"]
    return messages[0]["content"]


def reason(excinfo: pytest.ExceptionInfo[ParseError]) -> str:
    return excinfo.value.reason


# --- prompts ---------------------------------------------------------------------------------


def test_self_instruct_prompt_shows_paper_text_format_and_seeds() -> None:
    text = content(P.self_instruct_messages(SEEDS, n=20))
    assert text.startswith("你被要求设计20个不同的<角色，指令，输入>三元组")
    assert "例如“呼吸内科医生”" in text and "输入可以为空" in text
    assert text.endswith("20个三元组的清单如下：")
    assert "1. 角色：呼吸内科医生\n指令：请解释下面这个检查结果。\n输入：胸部CT" in text
    assert "2. 角色：药剂师\n指令：列出某种药物的主要禁忌症。\n输入：无" in text
    # the seeds are rendered in the format the parser reads back
    shown = text[text.index("1. 角色") : text.index("20个三元组的清单")]
    assert parse_triplets(shown) == SEEDS
    no_seeds = content(P.self_instruct_messages([], n=5))
    assert "示例" not in no_seeds and no_seeds.endswith("5个三元组的清单如下：")
    assert "$" not in text + no_seeds


def test_role_answer_prompt() -> None:
    text = content(P.role_answer_messages("儿科医生", "孩子发烧38.5度怎么办？"))
    assert text.startswith("假设你是一名经验丰富的儿科医生，会对患者给予非常耐心且全面的回答")
    assert "如果患者提问：\n\n孩子发烧38.5度怎么办？\n\n那么，你会回答：" in text
    assert "经验丰富的医生，" in content(P.role_answer_messages(" ", "q"))
    assert SEEDS[0].question == "请解释下面这个检查结果。\n胸部CT示右肺下叶磨玻璃结节，直径6mm。"
    assert SEEDS[1].question == "列出某种药物的主要禁忌症。"


def test_agent_prompts_keep_private_inputs_apart() -> None:
    patient = P.patient_system_prompt(CASE)
    doctor = P.doctor_system_prompt(DIAGNOSIS)
    assert CASE in patient and "HuatuoGPT智能医生" in patient
    assert patient.endswith("当你认为整个问诊应该结束的时候请说：再见")
    assert DIAGNOSIS in doctor and "无法看到图片之类的材料或附件" in doctor
    assert "最后给出的诊断结果可以是" in doctor
    for private in ("咳嗽变异性哮喘", "肺功能检查", "总结建议"):
        assert private not in patient
    for private in ("咳嗽两周", "夜间加重", "病情描述"):
        assert private not in doctor
    eval_patient = P.eval_patient_system_prompt(CASE)
    assert eval_patient.startswith("你是一名患者") and "切记不要让对话结束" in eval_patient
    assert eval_patient.endswith(CASE) and "咳嗽变异性哮喘" not in eval_patient


def test_agent_messages_swap_roles_for_the_patient() -> None:
    system = P.patient_system_prompt(CASE)
    opening = P.patient_messages(system, [])
    assert opening == [turn("system", system), turn("user", P.DOCTOR_GREETING)]
    view = P.patient_messages(system, DIALOGUE[:2])
    assert [m["role"] for m in view] == ["system", "user", "assistant", "user"]
    assert view[2]["content"] == DIALOGUE[0]["content"]
    assert view[3]["content"] == DIALOGUE[1]["content"]
    assert P.patient_messages(system, [], greeting=None) == [turn("system", system)]
    doctor = P.doctor_messages("D", [turn("system", "S"), *DIALOGUE[:1]])
    assert doctor == [turn("system", "D"), DIALOGUE[0]]


def test_polish_answer_prompt() -> None:
    text = content(P.polish_answer_messages("头疼怎么办？", "多休息。"))
    assert text.startswith(
        "<患者问题>：头疼怎么办？\n\n<回复参考>：多休息。\n\n你是HuatuoGPT人工智能模型"
    )
    assert text.endswith("<HuatuoGPT回复>：")


def test_polish_dialogue_prompt_is_strict_and_round_trips() -> None:
    text = content(P.polish_dialogue_messages([turn("system", "S"), *DIALOGUE]))
    rendered = P.render_polish_dialogue(DIALOGUE)
    assert rendered.splitlines()[0] == "[1] 病人：医生您好，我咳嗽两周了。"
    assert "[2] 医生：您好，咳嗽有痰吗？\n晚上会加重吗？\n\n[3] 病人：" in rendered
    assert rendered in text and "\nS\n" not in text
    assert "保留对话逻辑和顺序" in text and "严格按照原来的格式及顺序（共4条发言" in text
    # the teacher's ideal answer is the dialogue itself, in the same format
    assert parse_polished_dialogue(rendered, DIALOGUE) == DIALOGUE


def test_rating_prompt() -> None:
    text = content(P.rating_messages(DIALOGUE[:2], "还要吃药吗？", "先检查。", "回答甲", "回答乙"))
    assert "[History]\nUser: 医生您好，我咳嗽两周了。\nAI assistant: 您好，咳嗽有痰吗？" in text
    assert "[Question]\n还要吃药吗？\n[End of question]" in text
    assert "[Standard answer]\n先检查。\n[End of standard answer]" in text
    assert '"Rating A: [score]; Rating B: [score]"' in text
    assert text.index("[Assistant A]\n回答甲") < text.index("[Assistant B]\n回答乙")
    assert "[History]\n(none)\n" in content(P.rating_messages([], "q", "r", "a", "b"))


def test_judge_prompt() -> None:
    text = content(P.judge_messages(DIALOGUE, "User: 你好\nAI assistant: 您好"))
    assert text.startswith("[Assistant 1]\nUser: 医生您好，我咳嗽两周了。\nAI assistant: 您好")
    assert "[Assistant 2]\nUser: 你好\nAI assistant: 您好\n[End of Assistant 2]" in text
    assert "Assistant 1 is 'better than', 'worse than', or 'equal to' Assistant 2" in text
    for label in VERDICT_CHOICES:
        assert f"'{label}'" in text
    assert "Assistant 1 is better than Assistant 2" in text


# --- triplets --------------------------------------------------------------------------------

LABELLED = """好的，以下是20个三元组：

1. 角色：呼吸内科医生
指令：请解释下面这个检查结果的意义。
输入：胸部CT示右肺下叶磨玻璃结节。

2.
角色：药剂师
指令：列出某种药物的禁忌症。
输入：无

3、角色：护士
指令：为下面这位患者写一份出院宣教。
输入：王某，男，65岁，冠脉支架术后。
血常规结果如下：
1. 白细胞 12.5
2. 中性粒细胞 80%

4. 角色：营养科医生
输入：糖尿病患者
5. 角色：患者家属
指令：
输入：无

希望这些三元组对您有帮助！"""


def test_parse_triplets_labelled() -> None:
    got = parse_triplets(LABELLED)
    assert got == [
        Triplet("呼吸内科医生", "请解释下面这个检查结果的意义。", "胸部CT示右肺下叶磨玻璃结节。"),
        Triplet("药剂师", "列出某种药物的禁忌症。", ""),
        Triplet(
            "护士",
            "为下面这位患者写一份出院宣教。",
            "王某，男，65岁，冠脉支架术后。\n血常规结果如下：\n1. 白细胞 12.5\n2. 中性粒细胞 80%",
        ),
    ]  # 4 and 5 have no instruction; the preamble and the closing remark are dropped


def test_parse_triplets_variants() -> None:
    text = (
        "### 1\n**角色**：皮肤科医生\n**指令**：“说明下面这种皮疹的护理要点。”\n**输入**：湿疹\n"
        "---\n(2) Role: 医学生\nInstruction: 总结某个疾病的鉴别诊断。\nInput: N/A\n"
        "第3个 角色: 康复科医生\n\n指令: 设计一份训练计划。\n\n输入：（无）\n"
        "4. 眼科医生\n指令：解释下面这个验光单。\n输入：右眼-3.50D。\n"
        "5. 指令：没有角色的指令也可以。"
    )
    assert parse_triplets(text) == [
        Triplet("皮肤科医生", "说明下面这种皮疹的护理要点。", "湿疹"),
        Triplet("医学生", "总结某个疾病的鉴别诊断。", ""),
        Triplet("康复科医生", "设计一份训练计划。", ""),
        Triplet("眼科医生", "解释下面这个验光单。", "右眼-3.50D。"),
        Triplet("", "没有角色的指令也可以。", ""),
    ]


def test_parse_triplets_unlabelled_three_lines() -> None:
    text = "呼吸内科医生\n解释下面的报告。\n肺功能FEV1/FVC 65%。\n\n儿科医生\n给出某种疫苗的接种时间表。\n"
    assert parse_triplets(text) == [
        Triplet("呼吸内科医生", "解释下面的报告。", "肺功能FEV1/FVC 65%。"),
        Triplet("儿科医生", "给出某种疫苗的接种时间表。", ""),
    ]
    numbered = "1. 呼吸内科医生\n解释下面的报告。\n无\n2. 儿科医生\n给出接种时间表。"
    assert [t.instruction for t in parse_triplets(numbered)] == [
        "解释下面的报告。",
        "给出接种时间表。",
    ]


@pytest.mark.parametrize(
    "text", ["", "   \n\n", "抱歉，我无法完成这个任务。", "角色：医生\n输入：无\n角色：护士"]
)
def test_parse_triplets_garbage(text: str) -> None:
    with pytest.raises(ParseError) as e:
        parse_triplets(text)
    assert reason(e) == "no triplets" and isinstance(e.value, ValueError)


# --- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "建议多喝水。",
        "  <HuatuoGPT回复>：建议多喝水。\n",
        "<HuatuoGPT回复>: 建议多喝水。",
        "HuatuoGPT：建议多喝水。",
        "HuatuoGPT: <HuatuoGPT>：建议多喝水。",
        "【回复】：建议多喝水。",
    ],
)
def test_parse_answer(text: str) -> None:
    assert parse_answer(text) == "建议多喝水。"


def test_parse_answer_keeps_inner_text_and_rejects_empty() -> None:
    assert (
        parse_answer("您好：\n1. 多休息\n2. HuatuoGPT：不在开头")
        == "您好：\n1. 多休息\n2. HuatuoGPT：不在开头"
    )
    for text in ("", "  \n", "<HuatuoGPT回复>：", "HuatuoGPT: "):
        with pytest.raises(ParseError) as e:
            parse_answer(text)
        assert reason(e) == "empty answer"


# --- polished dialogues ----------------------------------------------------------------------


def test_parse_polished_dialogue_variants() -> None:
    text = (
        "以下是修改后的对话：\n\n"
        "1. 患者: 医生您好，我咳嗽两周了，有点担心。\n\n"
        "[2] 医生：您好，我是医疗大模型。请问咳嗽有痰吗？\n晚上会加重吗？\n\n"
        "**病人**：没有痰，晚上比较厉害。\n"
        "医疗大模型：\n建议做肺功能检查。\n\n1. 避免冷空气\n2. 按时复诊"
    )
    got = parse_polished_dialogue(text, [turn("system", "S"), *DIALOGUE])
    assert got == [
        turn("system", "S"),
        turn("user", "医生您好，我咳嗽两周了，有点担心。"),
        turn("assistant", "您好，我是医疗大模型。请问咳嗽有痰吗？\n晚上会加重吗？"),
        turn("user", "没有痰，晚上比较厉害。"),
        turn("assistant", "建议做肺功能检查。\n1. 避免冷空气\n2. 按时复诊"),
    ]


@pytest.mark.parametrize(
    "text, expected_reason, detail",
    [
        ("好的，我来修改。", "no dialogue turns", ""),
        ("病人：你好\n医生：你好\n病人：谢谢", "turn count differs", "got 3, expected 4"),
        ("病人：a\n医生：b\n病人：c\n医生：d\n病人：e", "turn count differs", "got 5, expected 4"),
        (
            "病人：a\n病人：b\n医生：c\n医生：d",
            "role order differs",
            "turn 2 is 病人, expected 医生",
        ),
        ("病人：a\n医生：\n病人：c\n医生：d", "empty turn", "turn 2"),
    ],
)
def test_parse_polished_dialogue_rejects(text: str, expected_reason: str, detail: str) -> None:
    with pytest.raises(ParseError) as e:
        parse_polished_dialogue(text, DIALOGUE)
    assert reason(e) == expected_reason and e.value.detail == detail
    assert str(e.value) == (f"{expected_reason}: {detail}" if detail else expected_reason)


# --- ratings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Rating A: 8; Rating B: 6", (8.0, 6.0)),
        ("Rating A：7.5；Rating B：9", (7.5, 9.0)),
        ("rating a: [10]; rating b: [1]", (10.0, 1.0)),
        ("评分A：6；评分B：8", (6.0, 8.0)),
        ("A的评分：3分，B的评分：4分", (3.0, 4.0)),
        ("回答A的评分为7，回答B的得分是5.5", (7.0, 5.5)),
        ("Ｒａｔｉｎｇ Ａ：８；Ｒａｔｉｎｇ Ｂ：５", (8.0, 5.0)),
        ("Response A is more accurate.\n\nRating A: 9/10; Rating B: 7/10\nThanks.", (9.0, 7.0)),
        (
            'The format is "Rating A: [score]; Rating B: [score]".\nRating B: 2; Rating A: 5',
            (5.0, 2.0),
        ),
        ("Rating A: 4; Rating B: 4\nOn reflection: Rating A: 6; Rating B: 3", (6.0, 3.0)),
    ],
)
def test_parse_rating(text: str, expected: tuple[float, float]) -> None:
    assert parse_rating(text) == expected


@pytest.mark.parametrize(
    "text, expected_reason",
    [
        ("Both answers are good.", "no ratings"),
        ("I would score a 7 for the first and score b 5.", "no ratings"),
        ('"Rating A: [score]; Rating B: [score]"', "no ratings"),
        ("Rating A: 7", "no rating B"),
        ("Rating B: 7", "no rating A"),
        ("Rating A: 0; Rating B: 5", "rating out of range"),
        ("Rating A: 5; Rating B: 11", "rating out of range"),
        ("Rating A: -3; Rating B: 5", "rating out of range"),
    ],
)
def test_parse_rating_rejects(text: str, expected_reason: str) -> None:
    with pytest.raises(ParseError) as e:
        parse_rating(text)
    assert reason(e) == expected_reason


def test_every_string_of_the_rating_regex_parses() -> None:
    values = (
        ["10"]
        + [str(i) for i in range(1, 10)]
        + [f"{i}.{d}" for i in range(1, 10) for d in range(10)]
    )
    for a in values:
        for b in values:
            text = f"Rating A: {a}; Rating B: {b}"
            assert re.fullmatch(RATING_REGEX, text)
            assert parse_rating(text) == (float(a), float(b))
    for bad in (
        "Rating A: 0; Rating B: 5",
        "Rating A: 11; Rating B: 5",
        "Rating A: 10.5; Rating B: 5",
    ):
        assert not re.fullmatch(RATING_REGEX, bad)


# --- verdicts --------------------------------------------------------------------------------


def test_verdict_choices_parse() -> None:
    assert [parse_verdict(c) for c in VERDICT_CHOICES] == ["better", "worse", "equal"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Assistant 1 is more empathetic.\nAssistant 1 is better than Assistant 2", "better"),
        ("analysis...\n\nassistant 1 IS WORSE THAN assistant 2.", "worse"),
        ("Final: `Assistant 1 is equal to Assistant 2`", "equal"),
        (
            "Assistant 1 is 'better than' Assistant 2 in tone.\nAssistant 1 is worse than Assistant 2",
            "worse",
        ),
        ("Overall, Assistant 2 is better than Assistant 1.", "worse"),
        ("**Assistant 1 is better than Assistant 2**\n\n(tone and accuracy)", "better"),
    ],
)
def test_parse_verdict(text: str, expected: str) -> None:
    assert parse_verdict(text) == expected


@pytest.mark.parametrize(
    "text, expected_reason",
    [
        ("Both are fine.", "no verdict"),
        ("Assistant 1 is similar to Assistant 2", "no verdict"),
        (
            "Labels: 'Assistant 1 is better than Assistant 2', 'Assistant 1 is worse than "
            "Assistant 2', and 'Assistant 1 is equal to Assistant 2'.",
            "ambiguous verdict",
        ),
    ],
)
def test_parse_verdict_rejects(text: str, expected_reason: str) -> None:
    with pytest.raises(ParseError) as e:
        parse_verdict(text)
    assert reason(e) == expected_reason


def test_is_goodbye() -> None:
    for text in ("好的，谢谢医生，再见！", "拜拜", "Thanks, goodbye.", "OK, bye"):
        assert is_goodbye(text)
    for text in ("我还想问一下用药的问题。", "谢谢医生", "maybe by tomorrow"):
        assert not is_goodbye(text)
