"""Stage ``report``: the evaluation in one HTML page and one Markdown file.

    python -m huatuo_ray report --config jobs/tiny/report.yaml

Reads what the evaluation stages wrote and draws nothing new from models:

* ``benchmarks``: ``benchmark`` outputs (``metrics.json``) -> the metric table (paper table 2);
* ``comparisons``: ``judge`` or ``doctor-import`` outputs (``results.json``) -> a win/tie/loss
  table and a stacked-bar chart per category (tables 4-5, figures 3-4);
* ``training``: TensorBoard folders of ``sft``, ``reward-model`` or ``ppo`` -> training curves;
* ``models``: model artifacts whose manifests the report links (what was evaluated, from what).

``report.html`` is self-contained (charts embedded as PNG data); ``report.md`` links the same
charts as files under ``images/``.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from typing import Any

from huatuo_ray import storage
from huatuo_ray.config import ClusterConfig, option
from huatuo_ray.eval.tally import OUTCOMES, markdown
from huatuo_ray.eval.text_metrics import METRICS

COLOURS = {"win": "#4c9a2a", "tie": "#c9c9c9", "loss": "#c0392b"}


@dataclass
class Section:
    """One input of the report."""

    title: str = option(help="heading in the report")
    path: str = option(help="the stage's output folder (or a TensorBoard folder)", input="file")


@dataclass
class ReportConfig:
    """The evaluation report."""

    output: str = option(help="folder for report.html, report.md and images/")
    title: str = option("HuatuoGPT reproduction: evaluation", help="the report's title")
    benchmarks: list[str] = option(
        [], help="benchmark stage outputs", input="finished", made_by="benchmark"
    )
    comparisons: list[Section] = option([], help="judge or doctor-import outputs")
    training: list[Section] = option([], help="TensorBoard folders (sft, reward-model, ppo)")
    models: list[str] = option(
        [], help="model artifacts to link (their manifests)", input="artifact"
    )
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC")  # fmt: skip


def cjk_font() -> str | None:
    """An installed font that draws Chinese, if any (matplotlib's default does not)."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    return next((n for n in CJK_FONTS if n in names), None)


def chart_labels(names: list[str]) -> list[str]:
    """Category names as drawn: as they are when a font can draw them, else numbered (the
    report's table gives each number its name)."""
    if cjk_font() or all(n.isascii() for n in names):
        return names
    return [n if n.isascii() else f"#{i}" for i, n in enumerate(names, start=1)]


def comparison_chart(results: dict[str, Any], path: str) -> None:
    """Stacked horizontal bars of win/tie/loss rates per category, overall last (figure 3-4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if font := cjk_font():
        plt.rcParams["font.sans-serif"] = [font, "DejaVu Sans"]
    labels = chart_labels(list(results["table"]))
    rows = list(zip(labels, results["table"].values()))[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    left = [0.0] * len(rows)
    for outcome in OUTCOMES:
        widths = [100 * row[f"{outcome}_rate"] for _, row in rows]
        ax.barh([name for name, _ in rows], widths, left=left, color=COLOURS[outcome],
                label=outcome)  # fmt: skip
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"% of pairs ({results['a']} vs {results['b']})")
    ax.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard folder: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def training_chart(series: dict[str, list[tuple[int, float]]], path: str) -> list[str]:
    """Up to 6 curves in a grid; returns the tags drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preferred = ("loss", "reward_mean", "kl", "accuracy", "entropy", "value_loss", "lr")
    tags = sorted(series, key=lambda t: (not any(p in t for p in preferred), t))[:6]
    cols = min(3, len(tags))
    rows = (len(tags) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        steps, values = zip(*series[tag])
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(tags) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return tags


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Page:
    """The report built once, written as Markdown and as HTML."""

    def __init__(self, output: str):
        self.output, self.md, self.html = output, [], []
        os.makedirs(os.path.join(output, "images"), exist_ok=True)

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.md.append(_md_table(header, rows))
        self.html.append(_html_table(header, rows))

    def image(self, name: str, alt: str) -> None:
        path = os.path.join(self.output, "images", name)
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        self.md.append(f"![{alt}](images/{name})\n")
        self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')

    def link(self, label: str, target: str) -> None:
        self.md.append(f"- [{label}]({target})")
        self.html.append(f'<p><a href="{html.escape(target)}">{html.escape(label)}</a></p>')

    def write(self, title: str) -> None:
        with open(os.path.join(self.output, "report.md"), "w", encoding="utf-8") as f:
            f.write(f"# {title}\n\n" + "\n".join(self.md) + "\n")
        style = (
            "body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
            "padding:.2em .6em;text-align:right}td:first-child{text-align:left}img{max-width:100%}"
        )
        with open(os.path.join(self.output, "report.html"), "w", encoding="utf-8") as f:
            f.write(
                f'<!doctype html><html><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{style}</style><h1>{html.escape(title)}</h1>"
                + "\n".join(self.html)
                + "</html>"
            )


def _link_target(folder: str, output: str) -> str:
    """The folder's manifest (or its results/metrics file), relative to the report."""
    for name in ("manifest.json", "results.json", "metrics.json"):
        path = storage.join(folder, name)
        if storage.exists(path):
            break
    if "://" in path:
        return path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(output))


def main(config: ReportConfig) -> dict[str, Any]:
    if "://" in config.output:
        raise ValueError("report: output must be a local folder")
    page = Page(config.output)
    made: dict[str, Any] = {"benchmarks": 0, "comparisons": 0, "training": 0, "images": []}

    if config.benchmarks:
        page.heading("Benchmarks (zero-shot, table 2)")
        rows = []
        for folder in config.benchmarks:
            summary = storage.read_json(storage.join(folder, "metrics.json"))
            for name, scores in summary["metrics"].items():
                rows.append([name] + [f"{scores[m]:.2f}" for m in METRICS])
            made["benchmarks"] += 1
            page.text(f"{os.path.basename(folder.rstrip('/'))}: model {summary['model']}, "
                      f"{summary['tokenization']} tokens")  # fmt: skip
        page.table(["set", *METRICS], rows)

    for i, section in enumerate(config.comparisons):
        results = storage.read_json(storage.join(section.path, "results.json"))
        page.heading(section.title)
        page.text(markdown(results["table"], results["a"], results["b"], "").splitlines()[0])
        page.table(
            [
                results.get("category", "category"),
                "win",
                "tie",
                "loss",
                "win %",
                "tie %",
                "loss %",
                "inconsistent",
            ],  # fmt: skip
            [
                [
                    name,
                    str(r["win"]),
                    str(r["tie"]),
                    str(r["loss"]),
                    f"{100 * r['win_rate']:.0f}",
                    f"{100 * r['tie_rate']:.0f}",
                    f"{100 * r['loss_rate']:.0f}",
                    str(r["inconsistent"]),
                ]
                for name, r in results["table"].items()
            ],  # fmt: skip
        )
        name = f"comparison-{i}.png"
        comparison_chart(results, os.path.join(config.output, "images", name))
        page.image(name, f"{section.title}: win/tie/loss")
        made["comparisons"] += 1
        made["images"].append(name)

    for i, section in enumerate(config.training):
        series = training_scalars(section.path)
        page.heading(f"Training: {section.title}")
        if not series:
            page.text(f"no scalars in {section.path}")
            continue
        name = f"training-{i}.png"
        tags = training_chart(series, os.path.join(config.output, "images", name))
        page.image(name, f"{section.title}: " + ", ".join(tags))
        made["training"] += 1
        made["images"].append(name)

    if config.models or config.benchmarks or config.comparisons:
        page.heading("Artifacts")
        for folder in [*config.models, *config.benchmarks, *(s.path for s in config.comparisons)]:
            page.link(folder, _link_target(folder, config.output))
    page.write(config.title)
    made["report"] = os.path.join(os.path.abspath(config.output), "report.html")
    with open(os.path.join(config.output, "report.json"), "w") as f:
        json.dump(made, f, indent=2)
    return made
