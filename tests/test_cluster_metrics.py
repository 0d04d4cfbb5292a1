"""Every series the Grafana dashboard (cluster/grafana/huatuo.json) plots is exported by some
stage. That they reach a node's metrics endpoint, where Prometheus scrapes them, tagged by stage
and job, is checked where stages already run next to the tests' `ray start` head: sft's in
tests/train/test_sft.py (the killed job), the RL loop's in tests/rlmf/test_ppo.py (the same)."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "cluster" / "grafana" / "huatuo.json"


def exported_names() -> set[str]:
    """Every ``huatuo_*`` name a stage exports, read from the calls of :mod:`huatuo_ray.telemetry`
    (names written out, or a prefix over a loop's tuple of names)."""
    names: set[str] = set()
    call = re.compile(r"(?:telemetry\.)?(gauge|count)\(\s*(f?)\"(\w*)(\{name\})?\"")
    loop = re.compile(r"for name in \(([^)]*)\)[^\n]*\n(?:[^\n]*\n){0,1}?[^\n]*?telemetry\.(?:gauge|count)\(f\"(\w*)\{name\}\"")  # fmt: skip
    for path in (REPO / "huatuo_ray").rglob("*.py"):
        text = path.read_text()
        for _, _, name, placeholder in call.findall(text):
            if not placeholder:
                names.add(f"huatuo_{name}")
        for items, prefix in loop.findall(text):
            names |= {f"huatuo_{prefix}{n}" for n in re.findall(r"\"(\w+)\"", items)}
    return names


def test_every_series_the_grafana_dashboard_plots_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    assert {"huatuo_train_lr", "huatuo_ppo_clip_fraction", "huatuo_records_total"} <= exported
    plotted: set[str] = set()
    titles = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        titles.append(panel["title"])
        for target in panel["targets"]:
            names = set(re.findall(r"ray_(huatuo_\w+)", target["expr"]))
            assert names, target["expr"]
            assert 'job=~"$job"' in target["expr"] and "stage" in target["expr"], target["expr"]
            plotted |= {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}
    missing = {n for n in plotted if n not in exported and f"{n}_total" not in exported}
    assert not missing, missing
    assert len(titles) == len(set(titles))  # one panel per figure
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"stage", "job"} <= variables
