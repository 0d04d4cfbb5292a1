"""Stage benchmark: zero-shot answers on real QA records, scored, table shaped like table 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from huatuo_ray import artifacts
from huatuo_ray.config import ModelConfig
from huatuo_ray.data.convert import DataConfig, convert
from huatuo_ray.eval import benchmark
from huatuo_ray.eval.text_metrics import METRICS, score_corpus
from huatuo_ray.inference.generation import EngineConfig

pytestmark = pytest.mark.slow


def test_benchmark_on_real_records(
    local_ray, tiny_model_dir: str, tmp_path: Path, shared_datasets: Path
) -> None:
    cmd = str(tmp_path / "cmd")
    convert(
        DataConfig(
            source="cmd_csv",
            input=str(
                shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
            ),
            output=cmd,
            limit=6,
        )
    )
    web = tmp_path / "medQA.test.txt"  # webMedQA's documented format (no sample is available)
    web.write_text(
        "内科\t1\t1\t咳嗽一周怎么办？\t多喝水，注意休息，必要时就医。\n"
        "内科\t0\t1\t咳嗽一周怎么办？\t不用管。\n"
        "儿科\t1\t2\t孩子发烧38度要吃药吗？\t可以物理降温，超过38.5度再用退烧药。\n",
        encoding="utf-8",
    )
    convert(DataConfig(source="webmedqa", input=str(web), output=str(tmp_path / "web")))
    out = tmp_path / "bench"
    summary = benchmark.main(
        benchmark.BenchmarkConfig(
            sets=[
                benchmark.BenchmarkSet("CMD", cmd),
                benchmark.BenchmarkSet("webMedQA", str(tmp_path / "web")),
            ],
            output=str(out),
            model=ModelConfig(path=tiny_model_dir),
            engine=EngineConfig(backend="hf"),
            max_new_tokens=8,
            max_prompt_tokens=900,
        )
    )
    assert summary["counts"]["webMedQA"] == {"answered": 2, "rejected": 0}
    assert summary["counts"]["CMD"]["answered"] + summary["counts"]["CMD"]["rejected"] == 6
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| set | " + " | ".join(METRICS) + " |" and len(table) == 4
    for name in ("CMD", "webMedQA"):
        records = artifacts.read_dialogues(str(out / name))
        recomputed = score_corpus(
            [r.meta["prediction"] for r in records], [r.meta["reference"] for r in records]
        )
        assert summary["metrics"][name] == recomputed
        assert all(r.turns[-1]["role"] == "user" for r in records)
    assert json.loads((out / "metrics.json").read_text())["metrics"] == summary["metrics"]
