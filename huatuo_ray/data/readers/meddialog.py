"""MedDialog-CN (and CovidDialog-Chinese, same layout): raw text and preprocessed JSON.

Input: a ``.txt`` raw file, a ``.json`` preprocessed file, or a folder of them (read in name order).

Raw format (UTF-8): records start with a line ``id=N``, then the haodf.com URL, then sections, each
opened by a heading line: ``Doctor faculty`` (one line of hospital/department names),
``Description`` (``heading：value`` lines, e.g. ``病情描述： ...``), ``Dialogue`` (a speaker line
``医生：`` or ``病人：``, then the utterance on the following line(s)) and ``Diagnosis and
suggestions``. A record may have no ``Dialogue`` section or two of them.

Preprocessed format: a JSON array of dialogues, each an array of ``"病人：..."``/``"医生：..."``.

Rules:

* 病人 (patient) is ``user``, 医生 (doctor) is ``assistant``. Blank lines and empty utterances are
  skipped; the lines of one utterance, and consecutive utterances of one speaker, are merged into
  one turn joined with ``"\\n"``. Two ``Dialogue`` sections are concatenated (then merged).
* A raw dialogue that starts with the doctor (most haodf.com ones do) gets the Description's
  ``病情描述`` as its first user turn, as the authors' preprocessed files do; ``meta`` records this
  as ``description_as_first_turn``. With no ``病情描述`` the record is rejected. A preprocessed
  dialogue starting with the doctor is rejected (it has no description to open it).
* At least one doctor turn is required; trailing patient turns are kept.
* Rejected: no ``Dialogue`` section, an empty dialogue, text before the first speaker line, a line
  that is not UTF-8, a repeated ``id=N``.
* Ids: ``meddialog-{N}`` (raw), ``meddialog-{file stem}-{index}`` (preprocessed). Raw ``meta``: url,
  faculty, description (dict heading -> value), diagnosis (text or None).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from huatuo_ray.data.readers._util import (
    basename,
    checked,
    excerpt,
    input_files,
    json_array_items,
    stem,
    utf8_lines,
)
from huatuo_ray.data.readers.base import ReadResult, Reject
from huatuo_ray.dialogue import Dialogue, turn

SOURCE = "meddialog"
ROLES = {"病人": "user", "医生": "assistant"}
HEADINGS = ("Doctor faculty", "Description", "Dialogue", "Diagnosis and suggestions")
_ID = re.compile(r"^id=(\d+)\s*$")
_SPEAKER = re.compile(r"^(病人|医生)：(.*)$", re.S)
_FIELD = re.compile(r"^([^\s：:]{1,12})：\s*(.*)$")


def merge(utterances: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """Turns from (role, text) utterances: empty ones skipped, one speaker's run joined by \\n."""
    turns: list[dict[str, str]] = []
    for role, content in utterances:
        content = content.strip()
        if not content:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + content
        else:
            turns.append(turn(role, content))
    return turns


def parse_dialogue(lines: Iterable[str]) -> list[dict[str, str]]:
    """Turns of a speaker-line dialogue (``医生：`` / ``病人：`` lines, utterances below them).

    Raises ValueError for text before the first speaker line.
    """
    utterances: list[tuple[str, list[str]]] = []
    for line in lines:
        line = line.strip()
        m = _SPEAKER.match(line)
        if m:
            utterances.append((ROLES[m.group(1)], [m.group(2)]))
        elif line:
            if not utterances:
                raise ValueError(f"text before the first speaker line: {line[:40]!r}")
            utterances[-1][1].append(line)
    return merge((role, "\n".join(x for x in parts if x.strip())) for role, parts in utterances)


def parse_fields(lines: Iterable[str]) -> dict[str, str]:
    """``heading：value`` fields; the value may be on the heading's line or on the lines below."""
    fields: dict[str, str] = {}
    key = ""
    for line in lines:
        line = line.strip()
        m = _FIELD.match(line)
        if m:
            key = m.group(1)
            fields[key] = (fields.get(key, "") + "\n" + m.group(2)).strip()
        elif line:
            fields[key] = (fields.get(key, "") + "\n" + line).strip()
    return fields


def read(path: str) -> ReadResult:
    for file in input_files(path, (".txt", ".json")):
        if file.endswith(".json"):
            yield from _read_json(file)
        elif file.endswith(".txt"):
            yield from _read_raw(file)
        else:
            raise ValueError(
                f"{basename(file)}: expected a .txt (raw) or .json (preprocessed) file"
            )


def _read_json(file: str) -> ReadResult:
    for entry in json_array_items(file, "dialogues"):
        i, where, item = entry.index, entry.where, entry.value
        if not isinstance(item, list) or not all(isinstance(s, str) for s in item):
            yield Reject(where, "a dialogue must be a list of strings", excerpt(item))
            continue
        matches = [_SPEAKER.match(s.strip()) for s in item]
        bad = next((k for k, m in enumerate(matches) if m is None), None)
        if bad is not None:
            yield Reject(where, f"utterance {bad} does not start with 病人： or 医生：", item[bad])
            continue
        turns = merge((ROLES[m.group(1)], m.group(2)) for m in matches if m)
        reason = _check(turns)
        if reason is None and turns[0]["role"] != "user":
            reason = "dialogue starts with the doctor"
        if reason:
            yield Reject(where, reason, excerpt(item))
            continue
        meta = {"file": basename(file), "index": i}
        yield checked(Dialogue(f"{SOURCE}-{stem(file)}-{i}", SOURCE, turns, meta), where, item)


def _check(turns: list[dict[str, str]]) -> str | None:
    if not turns:
        return "empty dialogue"
    if not any(t["role"] == "assistant" for t in turns):
        return "no doctor reply in the dialogue"
    return None


def _read_raw(file: str) -> ReadResult:
    name = basename(file)
    seen: dict[str, str] = {}
    start, number, lines, bad = 0, "", [], 0

    def flush() -> ReadResult:
        where = f"{name}:{start}"
        if not number:  # text before the first id= line
            if any(x.strip() for x in lines) or bad:
                yield Reject(where, "text before the first id= line", "\n".join(lines))
        elif bad:
            yield Reject(where, f"line {bad} is not UTF-8", "\n".join(lines))
        elif number in seen:
            yield Reject(where, f"duplicate id={number} (first at {seen[number]})")
        else:
            seen[number] = where
            yield _parse_raw(number, lines, where)

    for n, line in utf8_lines(file):
        m = _ID.match(line) if line is not None else None
        if m:
            yield from flush()
            start, number, lines, bad = n, m.group(1), [], 0
        elif line is None:
            bad = bad or n
        else:
            start = start or n
            lines.append(line)
    yield from flush()


def _block(lines: list[str]) -> str | None:
    """The non-blank lines of a section, stripped and joined by \\n; None when there are none."""
    return "\n".join(x.strip() for x in lines if x.strip()) or None


def _parse_raw(number: str, lines: list[str], where: str) -> Dialogue | Reject:
    sections: dict[str, list[str]] = {h: [] for h in HEADINGS}
    n_dialogue, current, head = 0, None, []
    for line in lines:
        if line.strip() in HEADINGS:
            current = line.strip()
            n_dialogue += current == "Dialogue"
        elif current is None:
            head.append(line)
        else:
            sections[current].append(line)
    raw = "\n".join(lines)
    if n_dialogue == 0:
        return Reject(where, "no Dialogue section", raw)
    try:
        turns = parse_dialogue(sections["Dialogue"])
    except ValueError as e:
        return Reject(where, f"Dialogue: {e}", raw)
    reason = _check(turns)
    if reason:
        return Reject(where, reason, raw)
    description = parse_fields(sections["Description"])
    opened = turns[0]["role"] == "assistant"
    if opened:
        if not description.get("病情描述"):
            return Reject(where, "dialogue starts with the doctor and there is no 病情描述", raw)
        turns.insert(0, turn("user", description["病情描述"]))
    urls = [x.strip() for x in head if x.strip().startswith("http")]
    meta = {
        "url": urls[0] if urls else None,
        "faculty": _block(sections["Doctor faculty"]),
        "description": description,
        "diagnosis": _block(sections["Diagnosis and suggestions"]),
        "description_as_first_turn": opened,
    }
    return checked(Dialogue(f"{SOURCE}-{number}", SOURCE, turns, meta), where, raw)
