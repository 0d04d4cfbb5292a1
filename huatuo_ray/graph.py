"""The recipe's artifact graph: which config keys of each stage are inputs and which outputs.

``pipeline --dry-run`` resolves every step's config and checks, without running anything, that
every input is an earlier step's output (or lies inside one: ``models/sft/tensorboard``) or a
declared external input (dataset files, the base model). An input that is neither breaks the
graph; an external input that does not exist yet is listed with the command or download that
makes it.

Keys are dotted paths into the resolved config; ``[]`` walks a list (``sets[].path`` is the
``path`` of every item of ``sets``). Empty and unset values are skipped (optional inputs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

#: stage -> (input keys, output keys). A test checks every key against the stage's config class.
IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tiny-model": ((), ("output",)),
    "data": (("input",), ("output",)),
    "self-instruct": (("seeds",), ("output",)),
    "dialogues": (("input",), ("output",)),
    "polish": (("input",), ("output",)),
    "mixture": (("sources[].path", "eval_sets[]"), ("output",)),
    "sft": (("train", "validation", "model.path"), ("output",)),
    "sample": (("inputs[]", "model.path"), ("output",)),
    "score": (("input",), ("output",)),
    "reward-model": (("preferences", "model.path"), ("output",)),
    "ppo": (("inputs[]", "model.path", "reward.model.path", "critic.model.path"), ("output",)),
    "grpo": (("inputs[]", "model.path", "reward.model.path"), ("output",)),
    "dpo": (("preferences", "model.path"), ("output",)),
    "benchmark": (("sets[].path", "model.path"), ("output",)),
    "teacher-answers": (("input",), ("output",)),
    "judge": (("a.model", "a.answers", "b.model", "b.answers", "questions"), ("output",)),
    "consult": (("cases", "doctor_model"), ("output",)),
    "doctor-export": (("pairs",), ("output", "key_output")),
    "doctor-import": (("votes[]", "key"), ("output",)),
    "report": (
        ("benchmarks[]", "comparisons[].path", "training[].path", "models[]"),
        ("output",),
    ),
    "serve": (("model.path",), ()),
    "plan": ((), ()),
    "chat": ((), ()),
    "pipeline": ((), ()),
}


def values_at(tree: Any, key: str) -> list[str]:
    """Every non-empty string at a dotted key with ``[]`` list steps."""
    nodes = [tree]
    for part in key.split("."):
        is_list = part.endswith("[]")
        name = part[:-2] if is_list else part
        nodes = [n.get(name) for n in nodes if isinstance(n, dict)]
        if is_list:
            nodes = [item for n in nodes if isinstance(n, list) for item in n]
    return [n for n in nodes if isinstance(n, str) and n]


def normalised(path: str, project_dir: str) -> str:
    """A comparable form: URIs as they are (no trailing slash), local paths absolute."""
    if "://" in path:
        return path.rstrip("/")
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(project_dir, path))


def inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass
class Finding:
    """One input of one step and where it comes from."""

    step: int
    stage: str
    key: str
    path: str
    source: str  # "step N" | "external" | "missing"


@dataclass
class GraphReport:
    findings: list[Finding] = field(default_factory=list)
    broken: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.broken


def check(
    steps: list[tuple[str, dict[str, Any]]], externals: list[str], project_dir: str
) -> GraphReport:
    """Check resolved ``(stage, config values)`` steps in order against declared externals."""
    report = GraphReport()
    outputs: list[tuple[int, str]] = []
    external = [normalised(e, project_dir) for e in externals]
    for index, (stage, values) in enumerate(steps):
        ins, outs = IO[stage]
        for key in ins:
            for path in values_at(values, key):
                where = normalised(path, project_dir)
                made = [i for i, out in reversed(outputs) if inside(where, out)]
                if made:
                    source = f"step {made[0]}"
                elif any(inside(where, e) for e in external):
                    source = "external"
                else:
                    source = "missing"
                finding = Finding(index, stage, key, path, source)
                report.findings.append(finding)
                if source == "missing":
                    report.broken.append(finding)
        for key in outs:
            outputs += [(index, normalised(p, project_dir)) for p in values_at(values, key)]
    return report
