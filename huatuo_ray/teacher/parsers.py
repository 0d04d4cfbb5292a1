"""Parsers of teacher answers: pure functions from the answer text to structured results.

Each parser returns its result or raises :class:`ParseError`. The error's :attr:`ParseError.reason`
is a short fixed phrase (``"no verdict"``, ``"turn count differs"``, ...) that a pipeline can count
as a reject reason; ``str(error)`` adds the details (counts, values) for the log.

The regexes :data:`RATING_REGEX` and :data:`VERDICT_CHOICES` are for vLLM structured outputs
(``guided_regex`` / ``guided_choice``): they force even a tiny random model to give an answer that
:func:`parse_rating` / :func:`parse_verdict` accept, so that the pipelines run end to end on CPU.

Every parser also reads the JSON object of its shape in :mod:`~huatuo_ray.teacher.grammars`
(the answer of a ``response_format: json_schema`` request), e.g. ``{"rating_a": 7,
"rating_b": 9}``; an answer that is a JSON object without the shape's keys is a "wrong JSON shape".
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

Verdict = Literal["better", "worse", "equal"]

#: Speaker label of each dialogue role in the polish format (MedDialog's own labels).
SPEAKERS = {"user": "病人", "assistant": "医生"}
#: Labels a teacher may use instead, mapped to the role.
SPEAKER_ALIASES = {
    "病人": "user",
    "患者": "user",
    "用户": "user",
    "医生": "assistant",
    "医疗大模型": "assistant",
    "HuatuoGPT": "assistant",
}

#: Exactly the answer format of the mixed-feedback prompt, scores 1..10 with at most one decimal.
RATING_REGEX = r"Rating A: (10|[1-9](\.[0-9])?); Rating B: (10|[1-9](\.[0-9])?)"
#: The three label lines the judge prompt asks for, in the order better, worse, equal.
VERDICT_CHOICES = [
    "Assistant 1 is better than Assistant 2",
    "Assistant 1 is worse than Assistant 2",
    "Assistant 1 is equal to Assistant 2",
]


class ParseError(ValueError):
    """A teacher answer that cannot be used; ``reason`` is short and countable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Triplet:
    """A self-instruct seed or result: who asks (role), what (instruction), on what (input)."""

    role: str
    instruction: str
    input: str = ""

    @property
    def question(self) -> str:
        """The instruction followed by its input: the question put to the role-enhanced prompt."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


def json_answer(text: str, *keys: str) -> dict[str, Any] | None:
    """The JSON object of a structured answer (a ```json fence allowed), or None for plain text.
    Raises when it is an object without ``keys``."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    if not body.startswith("{"):
        return None
    try:
        found = json.loads(body)
    except ValueError:
        return None  # not JSON after all: read as plain text
    if not isinstance(found, dict) or any(k not in found for k in keys):
        raise ParseError("wrong JSON shape", f"want keys {', '.join(keys)}")
    return found


# --- self-instruct triplets ------------------------------------------------------------------

_NUMBER = re.compile(
    r"^\s*(?:#{1,6}\s*\d{1,3}\s*[.．、:：)）]?|[\[(（]?\d{1,3}\s*[.．、)）\]](?!\d)"
    r"|第\s*\d{1,3}\s*[个组条]|(?:三元组|triplet)\s*\d{1,3}\s*[.．:：]?)\s*",
    re.IGNORECASE,
)
_SEPARATOR = re.compile(r"^\s*(?:#{3,}|-{3,}|={3,}|\*{3,})\s*$")
_FIELD = re.compile(
    r"^\s*[-*•]?\s*[*<《【\[]*\s*(角色|指令|输入|role|instruction|input)\s*[*>》】\]]*\s*[:：]\s*(.*)$",
    re.IGNORECASE,
)
_FIELD_NAMES = {"角色": "role", "指令": "instruction", "输入": "input"}
_EMPTY_INPUTS = {"", "无", "空", "(无)", "（无）", "<无输入>", "none", "n/a", "null", "-"}


def _field(line: str) -> tuple[str, str] | None:
    m = _FIELD.match(line)
    if not m:
        return None
    name = m.group(1).lower()
    return _FIELD_NAMES.get(name, name), m.group(2).strip().strip("*").strip()


def _unquote(value: str) -> str:
    value = value.strip()
    for left, right in ('""', "“”", "「」", "『』"):
        if len(value) >= 2 and value[0] == left and value[-1] == right:
            return value[1:-1].strip()
    return value


def _split_blocks(text: str, labelled: bool) -> list[list[str]]:
    """Cut an answer into candidate triplet blocks (numbering, separators, a repeated field)."""
    lines = [line.strip() for line in text.splitlines()]
    blocks: list[list[str]] = [[]]
    after_blank = False
    for i, line in enumerate(lines):
        if not line:
            after_blank = True
            continue
        if _SEPARATOR.match(line):
            blocks.append([])
            after_blank = False
            continue
        numbered = _NUMBER.match(line)
        rest = line[numbered.end() :].strip() if numbered else line
        field = _field(rest) if rest else None
        seen = {f[0] for f in map(_field, blocks[-1]) if f}
        if numbered and labelled and rest and not field:
            # "1. 呼吸内科医生" opens an entry only if labelled lines follow; else it is a list
            # item inside an input ("1. 白细胞 12.5")
            following = next((x for x in lines[i + 1 :] if x), "")
            if blocks[-1] and _field(following) is None:
                numbered = None
                rest = line
        new_block = bool(numbered) or bool(
            field and (field[0] in seen or (field[0] == "role" and seen))
        )
        if not new_block and after_blank and not field:
            new_block = True  # text after a blank line opens a block; a missing field continues it
        if new_block and blocks[-1]:
            blocks.append([])
        after_blank = False
        if rest:
            blocks[-1].append(rest)
    return [b for b in blocks if b]


def _block_triplet(lines: list[str], labelled: bool) -> Triplet | None:
    fields: dict[str, str] = {}
    if not labelled:  # the paper's plain form: role, instruction, input on three lines
        if len(lines) < 2:
            return None
        fields = {"role": lines[0], "instruction": lines[1], "input": "\n".join(lines[2:])}
    else:
        last = None
        for line in lines:
            field = _field(line)
            if field:
                last = field[0]
                fields[last] = field[1]
            elif last is None:
                fields.setdefault("role", line)  # "1. 呼吸内科医生" before the labelled lines
            else:
                fields[last] = f"{fields[last]}\n{line}".strip()
    instruction = _unquote(fields.get("instruction", ""))
    if not instruction:
        return None
    given = _unquote(fields.get("input", ""))
    return Triplet(
        role=_unquote(fields.get("role", "")),
        instruction=instruction,
        input="" if given.lower() in _EMPTY_INPUTS else given,
    )


def parse_triplets(text: str) -> list[Triplet]:
    """The <role, instruction, input> triplets of a self-instruct answer, in order.

    Accepts numbered entries ("1.", "1、", "(1)", "### 1"), labelled lines ("角色：", "指令：",
    "输入：", or English) or the paper's unlabelled three lines, blank lines anywhere. An input of
    "无" becomes "". Entries without an instruction (a preamble, a closing remark) are dropped.
    """
    if (found := json_answer(text, "triplets")) is not None:
        return _json_triplets(found["triplets"])
    labelled = any(_field(_NUMBER.sub("", line, count=1)) for line in text.splitlines())
    blocks = _split_blocks(text, labelled)
    triplets = [t for b in blocks if (t := _block_triplet(b, labelled)) is not None]
    if not triplets:
        raise ParseError("no triplets")
    return triplets


def _json_triplets(items: Any) -> list[Triplet]:
    triplets = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not str(item.get("instruction", "")).strip():
            continue
        given = str(item.get("input", "")).strip()
        triplets.append(
            Triplet(
                role=str(item.get("role", "")).strip(),
                instruction=str(item["instruction"]).strip(),
                input="" if given.lower() in _EMPTY_INPUTS else given,
            )
        )
    if not triplets:
        raise ParseError("no triplets")
    return triplets


# --- single answers --------------------------------------------------------------------------

_ANSWER_TAG = re.compile(
    r"^\s*[*<《【\[]*\s*(?:HuatuoGPT|Huatuo\s*GPT|医生|回复|回答)\s*(?:回复|回答)?\s*[*>》】\]]*"
    r"\s*[:：]\s*",
    re.IGNORECASE,
)


def parse_answer(text: str) -> str:
    """The answer without leading role tags such as "<HuatuoGPT回复>：" or "HuatuoGPT:"."""
    if (found := json_answer(text, "answer")) is not None:
        text = str(found["answer"])
    answer = text.strip()
    while (m := _ANSWER_TAG.match(answer)) is not None:
        answer = answer[m.end() :].strip()
    if not answer:
        raise ParseError("empty answer")
    return answer


# --- polished dialogues ----------------------------------------------------------------------

_SPEAKER_LINE = re.compile(
    r"^\s*(?:[\[(（]?\d{1,3}\s*[.．、)）\]]?|第\s*\d{1,3}\s*[轮条句])?\s*[*<《【\[]*\s*("
    + "|".join(SPEAKER_ALIASES)
    + r")\s*[*>》】\]]*\s*[:：]\s*(.*)$",
    re.IGNORECASE,
)


def _speaker_role(label: str) -> str:
    return "assistant" if label.lower() == "huatuogpt" else SPEAKER_ALIASES[label]


def parse_polished_dialogue(
    text: str, original_turns: list[dict[str, str]]
) -> list[dict[str, str]]:
    """The turns of a polished dialogue, checked against the dialogue that was polished.

    Utterances start with "病人：" / "医生：" (or "患者", "医疗大模型", ...; full-width or ASCII
    colon; optional numbering such as "[3]"); other lines continue the previous utterance, and
    text before the first utterance is dropped. A system turn of ``original_turns`` is not shown
    to the teacher and is kept as it was, so the result has the shape of ``original_turns``.
    """
    parsed: list[dict[str, str]] = []
    if (found := json_answer(text, "turns")) is not None:
        for item in found["turns"] if isinstance(found["turns"], list) else []:
            label = str(item.get("speaker", "")) if isinstance(item, dict) else ""
            if label.lower() != "huatuogpt" and label not in SPEAKER_ALIASES:
                raise ParseError("unknown speaker", label)
            parsed.append(
                {"role": _speaker_role(label), "content": str(item.get("content", "")).strip()}
            )
    for raw in text.splitlines() if found is None else []:
        line = raw.strip()
        m = _SPEAKER_LINE.match(line)
        if m:
            parsed.append({"role": _speaker_role(m.group(1)), "content": m.group(2).strip()})
        elif line and parsed:
            parsed[-1]["content"] = f"{parsed[-1]['content']}\n{line}".strip()
    system = [t for t in original_turns if t["role"] == "system"]
    expected = [t["role"] for t in original_turns if t["role"] != "system"]
    if not parsed:
        raise ParseError("no dialogue turns")
    if len(parsed) != len(expected):
        raise ParseError("turn count differs", f"got {len(parsed)}, expected {len(expected)}")
    for i, (t, role) in enumerate(zip(parsed, expected), start=1):
        if t["role"] != role:
            got, want = SPEAKERS[t["role"]], SPEAKERS[role]
            raise ParseError("role order differs", f"turn {i} is {got}, expected {want}")
        if not t["content"]:
            raise ParseError("empty turn", f"turn {i}")
    return system + parsed


# --- mixed-feedback ratings and judge verdicts -----------------------------------------------

_NUM = r"\[?\s*(-?\d+(?:\.\d+)?)"
_RATING = [  # "Rating A: 8", "评分A：8"; then "A的评分：8", "回答A评分为8"
    re.compile(
        r"(?:rating|score|评分|打分|得分|分数)\s*(?:for\s*)?(?:assistant|response|助手|回答)?\s*"
        r"\[?([AB])\]?\s*(?:的?(?:评分|得分|分数))?\s*[:=为是]\s*" + _NUM,
        re.IGNORECASE,
    ),
    re.compile(r"(?<![A-Za-z])([AB])\s*的?(?:评分|得分|分数)\s*[:=为是]\s*" + _NUM),
]


def parse_rating(text: str) -> tuple[float, float]:
    """(score A, score B) from an answer containing "Rating A: x; Rating B: y".

    Full-width characters are normalised first; "评分A：7" and the like are accepted; when the
    teacher repeats the format, the last score given for each response counts. Scores must lie in
    1..10.
    """
    if (given := json_answer(text, "rating_a", "rating_b")) is not None:
        try:
            scores = float(given["rating_a"]), float(given["rating_b"])
        except (TypeError, ValueError):
            raise ParseError("no ratings", "not numbers") from None
        return _in_range(*scores)
    norm = unicodedata.normalize("NFKC", text)
    found: dict[str, tuple[int, float]] = {}
    for pattern in _RATING:
        for m in pattern.finditer(norm):
            label, pos = m.group(1).upper(), m.start()
            if label not in found or pos >= found[label][0]:
                found[label] = (pos, float(m.group(2)))
    if not found:
        raise ParseError("no ratings")
    for label in "AB":
        if label not in found:
            raise ParseError(f"no rating {label}")
    return _in_range(found["A"][1], found["B"][1])


def _in_range(a: float, b: float) -> tuple[float, float]:
    for label, value in (("A", a), ("B", b)):
        if not 1 <= value <= 10:
            raise ParseError("rating out of range", f"rating {label} = {value:g}")
    return a, b


_VERDICT = re.compile(
    r"assistant\s*([12])\s*is\s*[`'\"‘’“”*]*\s*(better\s+than|worse\s+than|equal\s+to)"
    r"\s*[`'\"‘’“”*]*\s*assistant\s*([12])",
    re.IGNORECASE,
)
_INVERSE: dict[Verdict, Verdict] = {"better": "worse", "worse": "better", "equal": "equal"}


def _verdict(m: re.Match[str]) -> Verdict | None:
    word = m.group(2).split()[0].lower()
    verdict: Verdict = "better" if word == "better" else "worse" if word == "worse" else "equal"
    if (m.group(1), m.group(3)) == ("1", "2"):
        return verdict
    if (m.group(1), m.group(3)) == ("2", "1"):  # "Assistant 2 is worse than Assistant 1"
        return _INVERSE[verdict]
    return None


def parse_verdict(text: str) -> Verdict:
    """The judge's verdict on conversation 1 against conversation 2.

    Taken from the last "Assistant 1 is better than / worse than / equal to Assistant 2" in the
    text (case-insensitive, quotes or backticks around the label allowed; "Assistant 2 is ...
    Assistant 1" counts, inverted). A line that names two different verdicts (an echo of the
    instructions) is ambiguous.
    """
    if (found := json_answer(text, "verdict")) is not None:
        text = str(found["verdict"])
    norm = unicodedata.normalize("NFKC", text)
    matches = [(m, v) for m in _VERDICT.finditer(norm) if (v := _verdict(m)) is not None]
    if not matches:
        raise ParseError("no verdict")
    last, verdict = matches[-1]
    line_start = norm.rfind("\n", 0, last.start()) + 1
    on_line = {v for m, v in matches if m.start() >= line_start}
    if len(on_line) > 1:
        raise ParseError("ambiguous verdict", ", ".join(sorted(on_line)))
    return verdict


_GOODBYE = re.compile(r"再见|拜拜|good\s*-?\s*bye|bye\s*-?\s*bye|\bbye\b", re.IGNORECASE)


def is_goodbye(text: str) -> bool:
    """Whether the simulated patient ends the consultation (the paper's patient says 再见)."""
    return _GOODBYE.search(text) is not None
