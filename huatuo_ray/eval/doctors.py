"""Stages ``doctor-export`` and ``doctor-import``: the paper's doctor evaluation, by hand.

    python -m huatuo_ray doctor-export --pairs JUDGE_OUTPUT --output raters/ --key-output private/
    python -m huatuo_ray doctor-import --votes raters/votes-*.csv --key private/key.json --output r/

Export takes judged pairs (the ``judge`` stage's output), picks ``n`` of them (the paper: 50) and
writes, for the raters, ``pairs.csv`` and ``form.html``: each item has an anonymous id and the two
responses in a seeded order of their own (not the judge's), with no model names. The mapping that
unscrambles them goes to ``key.json`` in ``key_output``, a folder the raters do not get (it must
differ from ``output``). The form is one static page: a rater picks 1, 2 or equal per item and
downloads ``votes.csv``.

Import reads one or more ``votes.csv`` (``item,vote``; vote ``1``, ``2`` or ``equal``), unscrambles
them with the key and writes the same win/tie/loss tables as ``judge`` (every rater's vote counts
once). Rows with an unknown item or an invalid vote are rejected with ``file:line`` and counted.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import artifacts, storage
from huatuo_ray.config import ClusterConfig, input_artifact, option, to_dict
from huatuo_ray.eval.tally import markdown, tally
from huatuo_ray.teacher.prompts import render_conversation

VOTES = {"1", "2", "equal"}


@dataclass
class DoctorExportConfig:
    """Anonymised, order-scrambled pairs for human raters."""

    pairs: str = input_artifact("the judge stage's output (judged pairs)", made_by="judge")
    output: str = option(help="folder for the raters: pairs.csv and form.html")
    key_output: str = option(help="folder for key.json (kept from the raters)")
    n: int = option(50, help="pairs to rate (the paper: 50)")
    seed: int = option(0, help="seed of the subset, the item ids and the order")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if os.path.abspath(self.output) == os.path.abspath(self.key_output):
            raise ValueError("key_output must not be the raters' folder")


@dataclass
class DoctorImportConfig:
    """Raters' votes into win/tie/loss tables."""

    votes: list[str] = option(help="votes.csv files (item,vote), one per rater", input="file")
    key: str = option(
        help="key.json written by doctor-export", input="file", made_by="doctor-export"
    )
    output: str = option(help="folder for results.json and table.md")
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _text(conversation: list[dict[str, str]]) -> str:
    return render_conversation(conversation, user_label="患者", assistant_label="医生")


def export_main(config: DoctorExportConfig) -> dict[str, Any]:
    records = sorted(artifacts.read_dialogues(config.pairs), key=lambda r: r.id)
    rng = random.Random(config.seed)
    chosen = sorted(rng.sample(records, min(config.n, len(records))), key=lambda r: r.id)
    rng.shuffle(chosen)
    items, key = [], {}
    for record in chosen:
        item = f"{rng.getrandbits(40):010x}"
        a_is_1 = rng.random() < 0.5
        m = record.meta
        one, two = (m["conversation_a"], m["conversation_b"])
        if not a_is_1:
            one, two = two, one
        items.append({"item": item, "category": m.get("category") or "",
                      "response_1": _text(one), "response_2": _text(two), "vote": ""})  # fmt: skip
        key[item] = {"pair": m["key"], "category": m.get("category"), "a_is_1": a_is_1,
                     "a": m["a"], "b": m["b"], "judge_outcome": m.get("outcome")}  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=["item", "category", "response_1", "response_2", "vote"]
    )
    writer.writeheader()
    writer.writerows(items)
    storage.write_bytes(
        storage.join(config.output, "pairs.csv"), buffer.getvalue().encode("utf-8-sig")
    )
    storage.write_bytes(storage.join(config.output, "form.html"), form_html(items).encode())
    storage.write_json(storage.join(config.key_output, "key.json"), key)
    summary = {"items": len(items), "pairs_available": len(records), "config": to_dict(config)}
    storage.write_json(storage.join(config.output, "export.json"), {"items": len(items)})
    return summary


def form_html(items: list[dict[str, str]]) -> str:
    """One static page: two responses per item, a choice, and a button that saves votes.csv."""
    blocks = []
    for it in items:
        i = html.escape(it["item"])
        choices = "".join(
            f'<label><input type="radio" name="{i}" value="{v}"> {label}</label> '
            for v, label in (("1", "回答 1 更好"), ("equal", "一样好"), ("2", "回答 2 更好"))
        )
        blocks.append(
            f"<section><h3>{i} <small>{html.escape(it['category'])}</small></h3>"
            f'<div class="pair"><pre>{html.escape(it["response_1"])}</pre>'
            f"<pre>{html.escape(it['response_2'])}</pre></div><p>{choices}</p></section>"
        )
    script = (
        "function save(){const rows=['item,vote'];"
        "document.querySelectorAll('section').forEach(s=>{const c=s.querySelector('input:checked');"
        "if(c)rows.push(c.name+','+c.value);});"
        "const a=document.createElement('a');"
        "a.href=URL.createObjectURL(new Blob([rows.join('\\n')+'\\n'],{type:'text/csv'}));"
        "a.download='votes.csv';a.click();}"
    )
    return (
        '<!doctype html><html lang="zh"><meta charset="utf-8"><title>医生评估</title>'
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        ".pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}"
        "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}</style>"
        "<h1>医生评估</h1><p>请比较每组的两个回答（诊断、治疗、用药是否准确），选择更好的一个。</p>"
        + "".join(blocks)
        + f'<button onclick="save()">保存 votes.csv</button><script>{script}</script></html>'
    )


def import_main(config: DoctorImportConfig) -> dict[str, Any]:
    key = storage.read_json(config.key)
    outcomes, rejects = [], []
    for path in config.votes:
        text = storage.read_bytes(path).decode("utf-8-sig")
        for line_no, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            where = f"{os.path.basename(path)}:{line_no}"
            item, vote = (row.get("item") or "").strip(), (row.get("vote") or "").strip().lower()
            if item not in key:
                rejects.append({"where": where, "reason": f"unknown item {item!r}"})
            elif vote not in VOTES:
                rejects.append({"where": where, "reason": f"vote {vote!r} is not 1, 2 or equal"})
            else:
                entry = key[item]
                outcome = "tie" if vote == "equal" else (
                    "win" if (vote == "1") == entry["a_is_1"] else "loss"
                )  # fmt: skip
                outcomes.append((str(entry["category"]), outcome))
    first = next(iter(key.values()), {"a": "A", "b": "B"})
    table = tally(outcomes)
    results = {"a": first["a"], "b": first["b"], "category": "category", "table": table,
               "votes": len(outcomes), "rejected": len(rejects), "raters": len(config.votes)}  # fmt: skip
    storage.write_json(storage.join(config.output, "results.json"), results)
    storage.write_bytes(
        storage.join(config.output, "table.md"),
        markdown(table, first["a"], first["b"], "category").encode(),
    )
    storage.write_bytes(
        storage.join(config.output, artifacts.REJECTS),
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode(),
    )
    return results
