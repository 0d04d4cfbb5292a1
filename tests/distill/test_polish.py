"""Stage `polish` on real samples, through a faulty proxy, then killed part-way and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from huatuo_ray import artifacts
from huatuo_ray.config import TeacherConfig
from huatuo_ray.data.convert import DataConfig, convert
from huatuo_ray.distill.polish import PolishConfig
from huatuo_ray.distill.polish import main as polish_main
from huatuo_ray.teacher.cache import ResponseCache
from huatuo_ray.teacher.stage import WorkersConfig
from tests.conftest import TEACHER_KEY, teacher_config  # noqa: E402
from tests.support.openai_servers import FaultyProxy, ScriptedOpenAIServer
from tests.support.scripted_teacher import MAX_POLISH_TURNS, medical_responder

REPO = Path(__file__).resolve().parents[2]
KEY = TEACHER_KEY

pytestmark = pytest.mark.slow


def teacher(base_url: str) -> TeacherConfig:
    return teacher_config(base_url)


def real_inputs(tmp_path: Path, shared: Path) -> tuple[str, str]:
    single = str(tmp_path / "cmd")
    convert(
        DataConfig(
            source="cmd_csv",
            input=str(shared / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"),
            output=single,
            limit=30,
        )
    )
    dialogues = str(tmp_path / "covid")
    convert(
        DataConfig(
            source="meddialog",
            input=str(shared / "covid_dialogue_zh" / "test_data.json"),
            output=dialogues,
            limit=20,
        )
    )
    return single, dialogues


def test_polish_real_samples_through_faults(
    local_ray, tmp_path: Path, shared_datasets: Path
) -> None:
    single, dialogues = real_inputs(tmp_path, shared_datasets)
    with ScriptedOpenAIServer(medical_responder, require_api_key=KEY) as server:
        with FaultyProxy(server.base_url, seed=7, fault_rate=0.25, hang_s=3.0) as proxy:
            paid = 0
            for source in (single, dialogues):
                out = str(tmp_path / f"polished-{Path(source).name}")
                manifest = polish_main(
                    PolishConfig(
                        input=source,
                        output=out,
                        teacher=teacher(proxy.base_url),
                        workers=WorkersConfig(num_workers=2, batch_size=8, max_parse_retries=1),
                    )
                )
                inputs = artifacts.read_dialogues(source)
                records = artifacts.read_dialogues(out)
                rejects = artifacts.read_rejects(out)
                # Every input is represented exactly once: a record or a reject.
                assert manifest["rows"] + manifest["rejects"]["count"] == len(inputs)
                from_ids = sorted(
                    [r.meta["from_id"] for r in records] + [r["where"] for r in rejects]
                )
                assert from_ids == sorted(d.id for d in inputs)
                for original in inputs:
                    if len(original.turns) > MAX_POLISH_TURNS:  # the script drops a turn: rejected
                        assert original.id in {r["where"] for r in rejects}
                for record in records:
                    source_turns = next(d for d in inputs if d.id == record.meta["from_id"]).turns
                    # One question and one answer: A.3's prompt; a longer dialogue: A.4's.
                    single_turn = len(source_turns) == 2
                    assert record.source == ("polish_single" if single_turn else "polish_dialogue")
                    assert [t["role"] for t in record.turns] == [t["role"] for t in source_turns]
                    assert record.meta["reference"]
                for reject in rejects:
                    assert reject["reason"].startswith(
                        "unparseable teacher answer: turn count differs"
                    )
                usage = manifest["teacher"]["usage"]
                paid += usage["paid"]
                assert usage["failed"] == 0 and usage["retries"] > 0
                assert manifest["teacher"]["model"] == "scripted-teacher"
            stats = proxy.stats
            assert sum(stats.faults.values()) > 5
            assert set(stats.delivered_ok_by_key.values()) == {1}  # no answer paid twice
            assert paid == stats.delivered_ok  # the manifests account for every paid call
    assert KEY not in "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*.json*"))


def test_polish_killed_and_resumed_pays_nothing_twice(
    tmp_path: Path, shared_datasets: Path
) -> None:
    single, _ = real_inputs(tmp_path, shared_datasets)
    out = tmp_path / "polished"
    env = {**os.environ, "HUATUO_TEST_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    with ScriptedOpenAIServer(medical_responder, latency_s=0.3, max_concurrency=2) as server:
        with FaultyProxy(server.base_url, seed=1, fault_rate=0.2, hang_s=6.0) as proxy:
            cmd = [
                sys.executable, "-m", "huatuo_ray", "polish",
                "--input", single, "--output", str(out),
                f"teacher.base_url={proxy.base_url}", "teacher.model=scripted-teacher",
                "teacher.api_key_env=HUATUO_TEST_KEY", "teacher.timeout_s=4.0",
                "teacher.backoff_base_s=0.02", "teacher.backoff_max_s=0.1", "teacher.max_retries=20",
                "workers.num_workers=1", "workers.batch_size=4", "cluster.num_cpus=2",
                "cluster.address=local",  # its own Ray, killed with it
            ]  # fmt: skip
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.time() + 120
            while proxy.stats.delivered_ok < 8:
                assert proc.poll() is None, "stage ended before it could be killed"
                assert time.time() < deadline
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
            proc.wait()
            # Let whatever was in flight at the kill drain (nothing may arrive for 2 s).
            settled, last, quiet_since = time.time() + 20, -1, time.time()
            while time.time() < settled and time.time() - quiet_since < 2:
                if proxy.stats.delivered_ok != last:
                    last, quiet_since = proxy.stats.delivered_ok, time.time()
                time.sleep(0.1)
            paid_before = proxy.stats.delivered_ok
            cached_at_kill = len(ResponseCache(str(out / "_teacher_cache")))
            assert paid_before < 30 and not (out / "manifest.json").exists()
            assert cached_at_kill >= 4

            res = subprocess.run(
                cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
            )
            assert res.returncode == 0, res.stderr[-3000:]
            stats = proxy.stats
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] + manifest["rejects"]["count"] == 30
    ids = [r.id for r in artifacts.read_dialogues(str(out))]
    assert len(ids) == len(set(ids)) == manifest["rows"]
    usage = manifest["teacher"]["usage"]
    # Every answer stored before the kill is reused; the only answers bought twice are the few
    # that were in flight when the process died (paid, but never received or stored).
    assert usage["cached"] >= cached_at_kill
    # The proxy counts an answer as delivered once written; a client that timed out at that very
    # moment never reads it and asks again: such answers are paid but not in the usage.
    assert paid_before + usage["paid"] <= stats.delivered_ok
    repeated = sum(n - 1 for n in stats.delivered_ok_by_key.values())
    assert repeated <= paid_before - cached_at_kill <= 8
