"""Every structured-output shape accepts the answers its parser reads, and only such answers."""

from __future__ import annotations

import re

from huatuo_ray.dialogue import turn
from huatuo_ray.teacher import grammars, parsers


def test_answer_shape() -> None:
    regex = grammars.answer().vllm["regex"]
    for text in ["您好建议多喝水注意休息。", "头痛多久了呢？请及时就医检查一下。好的谢谢医生。"]:
        assert re.fullmatch(regex, text)
        assert parsers.parse_answer(text) == text
    assert not re.fullmatch(regex, "")  # an empty answer cannot be produced


def test_triplets_shape() -> None:
    regex = grammars.triplets(2).vllm["regex"]
    text = (
        "1.\n角色：儿科医生\n指令：请解释下面这个发热问题的处理。\n输入：孩子发烧两天\n\n"
        "12.\n角色：药师\n指令：列出这种药物的常见副作用。\n输入：\n\n"
    )
    assert re.fullmatch(regex, text)
    triplets = parsers.parse_triplets(text)
    assert [t.role for t in triplets] == ["儿科医生", "药师"]
    assert triplets[1].input == ""
    assert not re.fullmatch(grammars.triplets(3).vllm["regex"], text)  # exactly n triplets


def test_polished_dialogue_shape_fixes_speakers_and_count() -> None:
    turns = [turn("user", "头痛"), turn("assistant", "多休息"), turn("user", "好的")]
    regex = grammars.polished_dialogue(turns).vllm["regex"]
    text = (
        "[1] 病人：医生我头痛好几天了。\n\n[2] 医生：请您多休息多喝水。\n\n[3] 病人：好的谢谢医生。"
    )
    assert re.fullmatch(regex, text)
    assert [t["role"] for t in parsers.parse_polished_dialogue(text, turns)] == [
        "user",
        "assistant",
        "user",
    ]
    swapped = text.replace("[2] 医生", "[2] 病人")
    assert not re.fullmatch(regex, swapped)


def test_rating_and_verdict_shapes() -> None:
    assert re.fullmatch(grammars.rating().vllm["regex"], "Rating A: 7; Rating B: 10")
    assert parsers.parse_rating("Rating A: 7; Rating B: 10") == (7.0, 10.0)
    assert {parsers.parse_verdict(c) for c in grammars.verdict().vllm["choice"]} == {
        "better",
        "worse",
        "equal",
    }
