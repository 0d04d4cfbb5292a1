"""A stage-1 stage survives losing a worker node: polish on a two-node Cluster, the worker node
removed while answers are still coming in; every input still ends as exactly one record or reject,
and only answers in flight at the loss can be paid twice. (PPO rollouts over two nodes:
test_ppo.test_ppo_on_two_nodes_spreads_rollouts_and_runs_data_parallel_groups.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from huatuo_ray import artifacts
from tests.distill.test_polish import real_inputs

pytestmark = [pytest.mark.system, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[1]


def test_polish_finishes_after_a_worker_node_is_removed(
    tmp_path: Path, shared_datasets: Path
) -> None:
    single, _ = real_inputs(tmp_path, shared_datasets)
    out = tmp_path / "polished"
    res = subprocess.run(
        [sys.executable, "-m", "tests.stage1_node_loss", single, str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["nodes_before"] == 2 and result["nodes_after"] == 1
    assert result["answers_before_removal"] < 30  # the node went while work was left
    inputs = artifacts.read_dialogues(single)
    records, rejects = artifacts.read_dialogues(str(out)), artifacts.read_rejects(str(out))
    ids = [r.meta["from_id"] for r in records] + [r["where"] for r in rejects]
    assert sorted(ids) == sorted(d.id for d in inputs)  # nothing lost, nothing doubled
    # At most the requests in flight when the node went (2 workers x batch 4) were paid again.
    assert result["paid_twice"] <= 8, result
