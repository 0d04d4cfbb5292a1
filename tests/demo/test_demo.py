"""`make demo`: the target runs the demo module, whose dry run resolves the tiny pipeline under
``--output`` with an unbroken artifact graph and writes nothing. (The whole run is what the
system check `tests/test_pipeline.py` does as Ray jobs; `make demo` itself took 568 s, see
benchmarks/RESULTS.md.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_make_demo_runs_the_demo_module() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "-m huatuo_ray.demo --output outputs/demo" in recipe


def test_dry_run_resolves_every_step_under_the_output_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-m", "huatuo_ray.demo", "--output", str(out), "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    steps = yaml.safe_load((REPO / "jobs/tiny/pipeline.yaml").read_text(encoding="utf-8"))["steps"]
    assert f"pipeline tiny: {len(steps)} steps" in res.stdout
    assert "BROKEN" not in res.stdout
    outputs = re.findall(r"^\s+\d+ \S+\s+-> (.*)$", res.stdout, flags=re.M)
    assert len(outputs) == len(steps)
    assert all(o.startswith(str(out)) for o in outputs if o != "(no output)"), outputs
    assert not out.exists()
