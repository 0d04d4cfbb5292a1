"""A scripted teacher that answers every prompt of the recipe in the shape the parsers expect.

It is the ``responder`` of :class:`~tests.support.openai_servers.ScriptedOpenAIServer` for
tests and the offline demo: deterministic (answers depend only on the request and a hash), fast,
and honest about being a script — its medical content is canned. It recognises the prompt by the
paper's own wording, so it exercises the real prompt builders and parsers end to end.

Deliberate imperfections, so that reject paths run too: a dialogue to polish with more than
``MAX_POLISH_TURNS`` turns comes back one turn short (the parser must reject it), and a question
containing ``GARBLE`` is answered with nothing usable.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

MAX_POLISH_TURNS = 10
ROLES = ["呼吸内科医生", "儿科医生", "皮肤科医生", "药剂师", "营养师", "社区护士", "心内科医生"]
VERBS = ["解释", "总结", "列出", "比较", "改写", "评估", "规划", "说明", "整理", "提醒"]
TOPICS = [
    "高血压患者的日常饮食", "儿童发热的家庭护理", "湿疹的皮肤保湿", "糖尿病足的预防",
    "慢性咳嗽的常见原因", "孕期补铁的注意事项", "术后伤口的护理", "失眠的非药物治疗",
    "老年人跌倒的预防", "哮喘吸入剂的使用方法", "痛风患者的饮水", "胃食管反流的生活调整",
]  # fmt: skip


def _h(*parts: Any) -> int:
    text = json.dumps(parts, ensure_ascii=False, sort_keys=True)
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _triplets(prompt: str, n: int) -> str:
    seed = _h(prompt)
    blocks = []
    for i in range(n):
        k = seed + i * 7919
        role, verb, topic = (
            ROLES[k % len(ROLES)],
            VERBS[(k // 7) % len(VERBS)],
            TOPICS[(k // 13) % len(TOPICS)],
        )
        blocks.append(
            f"{i + 1}.\n角色：{role}\n指令：请{verb}下面这个关于{topic}的问题，第{k % 997}号。\n"
            f"输入：患者问：{topic}需要注意什么？"
        )
    return "\n\n".join(blocks)


def _doctor_reply(context: str) -> str:
    k = _h(context)
    topic = TOPICS[k % len(TOPICS)]
    return (
        f"您好，根据您的描述，这种情况与{topic}有关。建议您注意休息、清淡饮食，"
        "并观察症状变化。如果症状加重或持续不缓解，请及时到医院就诊。请问还有其他不适吗？"
    )


def _patient_reply(messages: list[dict[str, str]]) -> str:
    patient_turns = sum(m["role"] == "assistant" for m in messages)
    if patient_turns >= 2:
        return "好的，谢谢医生，我明白了。再见！"
    return ["医生您好，我最近身体不太舒服，想咨询一下。", "大概一周了，晚上更明显，需要做检查吗？"][
        patient_turns
    ]


def _polish_dialogue(prompt: str) -> str:
    utterances = re.findall(r"^\[(\d+)\] (病人|医生)：(.*)$", prompt, flags=re.MULTILINE)
    out = [f"[{i}] {who}：{text}（已润色）" for i, who, text in utterances]
    if len(out) > MAX_POLISH_TURNS:
        out = out[:-1]
    return "\n\n".join(out)


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[-1].split(end, 1)[0].strip()


def _rating(prompt: str) -> str:
    """A consistent judge: each response scored by its ROUGE-L to the standard answer."""
    from huatuo_ray.data.similarity import rouge_l

    reference = _between(prompt, "[Standard answer]", "[End of standard answer]")
    a = _between(prompt, "[Assistant A]", "[End of Assistant A]")
    b = _between(prompt, "[Assistant B]", "[End of Assistant B]")
    score_a, score_b = (1 + round(9 * rouge_l(r, reference)) for r in (a, b))
    return f"Rating A: {score_a}; Rating B: {score_b}"


def medical_responder(body: dict[str, Any]) -> str:
    """The answer to one chat-completions request body: the plain text, or its JSON object when
    the request asks for a ``response_format`` json_schema (as OpenAI's structured outputs do)."""
    text = _plain_answer(body)
    fmt = body.get("response_format") or {}
    if fmt.get("type") != "json_schema":
        return text
    return json.dumps(_as_json(fmt["json_schema"]["name"], text), ensure_ascii=False)


def _as_json(name: str, text: str) -> dict[str, Any]:
    """The scripted plain answer in the JSON shape named ``name`` (read with plain regexes, not
    with the project's parsers, which the tests check)."""
    if name == "ratings":
        a, b = re.findall(r"Rating [AB]: (\d+)", text)
        return {"rating_a": int(a), "rating_b": int(b)}
    if name == "verdict":
        return {"verdict": text.splitlines()[-1]}
    if name == "dialogue":
        turns = re.findall(r"^\[\d+\] (病人|医生)：(.*)$", text, flags=re.MULTILINE)
        return {"turns": [{"speaker": who, "content": said} for who, said in turns]}
    if name == "triplets":
        found = re.findall(r"角色：(.*)\n指令：(.*)\n输入：(.*)", text)
        return {"triplets": [{"role": r, "instruction": i, "input": x} for r, i, x in found]}
    return {"answer": text.removeprefix("<HuatuoGPT回复>：")}


def _plain_answer(body: dict[str, Any]) -> str:
    messages = body["messages"]
    last = messages[-1]["content"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    structured = (body.get("structured_outputs") or {}) if isinstance(body, dict) else {}
    if "GARBLE" in last:
        return "……"
    if "Rating A:" in last and "[Assistant A]" in last:
        return _rating(last)
    if "Assistant 1 is better than Assistant 2" in last and "[System]" in last:
        choices = structured.get("choice") or [
            "Assistant 1 is better than Assistant 2",
            "Assistant 1 is worse than Assistant 2",
            "Assistant 1 is equal to Assistant 2",
        ]
        return "Both answers are polite.\n" + choices[_h(last) % len(choices)]
    if "三元组" in last:
        n = int(m.group(1)) if (m := re.search(r"设计(\d+)个", last)) else 20
        return _triplets(last, n)
    if "<患者问题>" in last:
        question = last.split("<患者问题>：", 1)[-1].split("\n", 1)[0]
        return "<HuatuoGPT回复>：" + _doctor_reply(question)
    if "[1] 病人：" in last or "[1] 医生：" in last:
        return _polish_dialogue(last)
    if system.startswith("你是一名患者"):
        return _patient_reply(messages)
    return _doctor_reply(last)
