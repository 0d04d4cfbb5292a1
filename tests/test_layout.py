"""The package's import rule (see ``huatuo_ray/__init__.py``): cores never import a stage package
and stage packages never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "huatuo_ray"
CORES = ("data", "teacher", "train", "inference")
STAGE_PACKAGES = ("distill", "rlmf", "eval", "serve")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "huatuo_ray" else None


def test_cores_never_import_a_stage_package() -> None:
    broken = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for core in CORES
        for path in sorted((PACKAGE / core).rglob("*.py"))
        for name in _imports(path)
        if _package_of(name) in STAGE_PACKAGES
    ]
    assert broken == []


def test_stage_packages_do_not_import_each_other() -> None:
    broken = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for stage in STAGE_PACKAGES
        for path in sorted((PACKAGE / stage).rglob("*.py"))
        for name in _imports(path)
        if _package_of(name) in STAGE_PACKAGES and _package_of(name) != stage
    ]
    assert broken == []


def test_the_rule_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from huatuo_ray.rlmf.sample import x\n")
    assert _package_of(_imports(module)[0]) == "rlmf"


def test_readme_code_map_matches_the_stage_list() -> None:
    import re

    from huatuo_ray.stages import STAGES

    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Code map", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| `([^`]+)` \|", section, flags=re.M))
    assert set(rows) == set(STAGES)
    for name, stage in STAGES.items():
        assert rows[name] == stage.module.replace(".", "/") + ".py", name
        assert (PACKAGE.parent / rows[name]).is_file()


def test_every_make_command_the_docs_give_is_a_makefile_target() -> None:
    """README and the CI script name `make X` commands; each X is a target of the Makefile (a
    renamed target would otherwise leave the docs pointing at nothing)."""
    import re

    root = PACKAGE.parent
    targets = set(re.findall(r"^([a-z][\w-]*):", (root / "Makefile").read_text(), flags=re.M))
    for doc in (root / "README.md", root / ".ci" / "run"):
        text = doc.read_text(encoding="utf-8")  # commands: at a line's start or in backticks
        named = set(re.findall(r"(?:^|`)make ([a-z][\w-]*)", text, flags=re.M))
        assert named, doc
        assert named <= targets, (doc.name, named - targets)
    assert {"install", "test", "test-fast", "test-system", "demo"} <= targets


def test_tests_mirror_the_package_layout() -> None:
    """A package's tests live in ``tests/<package>/``; the root holds the cross-cutting ones (CLI,
    config, pipeline, clusters), the helper scripts and ``support/`` (the test doubles)."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith("__")}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders - {"support"} <= packages, folders - packages - {"support"}
    for folder in folders - {"support"}:
        assert list((tests / folder).glob("test_*.py")), folder
