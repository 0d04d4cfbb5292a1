"""Win/tie/loss tables of model A against model B, per category and overall (tables 4 and 5).

An outcome is A's: ``win``, ``tie`` or ``loss``; ``inconsistent`` (the judge changed its mind
when the order was swapped) is counted apart and left out of the rates.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

OUTCOMES = ("win", "tie", "loss")
OVERALL = "overall"


def tally(outcomes: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """``[(category, outcome)]`` -> {category: {win, tie, loss, inconsistent, n, win_rate, ...}},
    categories sorted, ``overall`` last."""
    counts: dict[str, Counter[str]] = {}
    for category, outcome in outcomes:
        counts.setdefault(category or "(none)", Counter())[outcome] += 1
        counts.setdefault(OVERALL, Counter())[outcome] += 1
    table: dict[str, dict[str, Any]] = {}
    for category in sorted(c for c in counts if c != OVERALL) + [OVERALL] * (OVERALL in counts):
        c = counts[category]
        n = sum(c[o] for o in OUTCOMES)
        row: dict[str, Any] = {o: c[o] for o in OUTCOMES}
        row.update(inconsistent=c["inconsistent"], n=n)
        row.update({f"{o}_rate": round(c[o] / n, 4) if n else 0.0 for o in OUTCOMES})
        table[category] = row
    return table


def markdown(table: dict[str, dict[str, Any]], a: str, b: str, category: str) -> str:
    lines = [
        f"{a} vs {b} (win = {a} judged better)",
        "",
        f"| {category} | win | tie | loss | win % | tie % | loss % | inconsistent |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in table.items():
        label = f"**{name}**" if name == OVERALL else name
        lines.append(
            f"| {label} | {row['win']} | {row['tie']} | {row['loss']} | "
            f"{100 * row['win_rate']:.0f} | {100 * row['tie_rate']:.0f} | "
            f"{100 * row['loss_rate']:.0f} | {row['inconsistent']} |"
        )
    return "\n".join(lines) + "\n"
