"""Presets that chain: one ``root`` per preset, every stage's inputs an earlier step's output or a
declared external input, checked by ``pipeline --dry-run`` without running anything."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from huatuo_ray import graph, pipeline
from huatuo_ray.config import ConfigError, load_config
from huatuo_ray.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["tiny", "paper", "open7b"]


def _pipeline(preset: str, *overrides: str) -> pipeline.PipelineConfig:
    path = str(REPO / "jobs" / preset / "pipeline.yaml")
    return load_config(pipeline.PipelineConfig, path, list(overrides))


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_of_every_preset_passes(preset: str, capsys: pytest.CaptureFixture) -> None:
    result = pipeline.main(_pipeline(preset, "dry_run=true"))
    out = capsys.readouterr().out
    assert result["steps"] == len(_pipeline(preset).steps) and "BROKEN" not in out
    assert "[missing]" not in out


def test_dry_run_is_a_cli_flag_and_writes_nothing(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "huatuo_ray", "pipeline", "--config", "jobs/paper/pipeline.yaml",
         "--dry-run", f"root={tmp_path / 'r'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "MISSING" in run.stdout and "make it: merge the Ziya" in run.stdout
    assert not (tmp_path / "r").exists()  # nothing written, not even the resolved configs


def test_a_broken_chain_exits_non_zero_naming_the_input(capsys: pytest.CaptureFixture) -> None:
    config = _pipeline("paper", "dry_run=true")
    config.steps = [s for s in config.steps if s.stage != "score"]  # nobody makes preferences
    with pytest.raises(SystemExit) as e:
        pipeline.main(config)
    assert "1 inputs come from nowhere" in str(e.value)
    assert "reward-model) preferences = /mnt/shared/huatuo/rlmf/preferences" in (
        capsys.readouterr().out
    )


def test_strict_fails_on_missing_external_inputs_until_they_exist(tmp_path: Path) -> None:
    config = _pipeline("paper", "dry_run=true", "strict=true", f"root={tmp_path}")
    with pytest.raises(SystemExit, match="external inputs missing"):
        pipeline.main(config)
    for e in config.external:  # make every missing declared input (empty stand-ins)
        if Path(e.path).exists():  # a file the project ships (the seeds): never overwrite it
            continue
        if e.path.endswith((".json", ".jsonl", ".csv", ".txt")):
            Path(e.path).parent.mkdir(parents=True, exist_ok=True)
            Path(e.path).write_text("")
        else:
            Path(e.path).mkdir(parents=True, exist_ok=True)
    assert pipeline.main(config)["missing_external"] == []


def test_every_graph_key_is_a_config_key() -> None:
    assert set(graph.IO) == set(STAGES)
    for stage, (ins, outs) in graph.IO.items():
        config_cls, _ = STAGES[stage].load()
        for key in ins + outs:
            cls: typing.Any = config_cls
            for part in key.replace("[]", "").split("."):
                hints = typing.get_type_hints(cls)
                assert part in {f.name for f in dataclasses.fields(cls)}, (stage, key)
                cls = hints[part]
                args = [a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)]
                cls = args[0] if args else cls


def test_root_comes_from_the_override_the_file_or_the_pipeline_beside_it(tmp_path: Path) -> None:
    sft_cls, _ = STAGES["sft"].load()
    beside = load_config(sft_cls, str(REPO / "jobs/paper/sft.yaml"))
    assert beside.train == "/mnt/shared/huatuo/mixture/train"
    assert beside.storage_path == "/mnt/shared/huatuo/ray_train"
    uri = load_config(sft_cls, str(REPO / "jobs/paper/sft.yaml"), ["root=s3://b/huatuo/"])
    assert (
        uri.output == "s3://b/huatuo/models/sft" and uri.model.path == "s3://b/huatuo/models/base"
    )
    alone = tmp_path / "sft.yaml"
    alone.write_text((REPO / "jobs/paper/sft.yaml").read_text())
    with pytest.raises(ConfigError, match=r"paths use \$\{root\} but no root is set"):
        load_config(sft_cls, str(alone))
    alone.write_text("root: /data/h\n" + alone.read_text())
    assert load_config(sft_cls, str(alone)).validation == "/data/h/mixture/validation"


def test_paper_and_open7b_presets_hold_no_placeholder_paths() -> None:
    for path in [*(REPO / "jobs/paper").glob("*.yaml"), *(REPO / "jobs/open7b").glob("*.yaml")]:
        text = path.read_text()
        assert "YOUR-BUCKET" not in text and "/mnt/shared" not in text.replace(
            "root: /mnt/shared/huatuo", ""
        ), path
        if path.name != "pipeline.yaml":
            assert yaml.safe_load(text).get("root") is None, path  # one root, in pipeline.yaml


def test_teacher_answers_keep_the_question_meta(shared_datasets: Path) -> None:
    from huatuo_ray.config import TeacherConfig
    from huatuo_ray.data.readers import READERS
    from huatuo_ray.dialogue import Dialogue
    from huatuo_ray.eval.teacher_answers import answer_record
    from huatuo_ray.teacher.client import TeacherClient
    from tests.support.openai_servers import ScriptedOpenAIServer

    path = str(shared_datasets / "huatuogpt_eval" / "KUAKE-QIC_100.json")
    questions = [r for r in READERS["kuake_qic"](path) if isinstance(r, Dialogue)][:3]
    not_a_question = Dialogue("x", "t", [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a"}], {})  # fmt: skip

    async def ask_all() -> list:
        client = TeacherClient(TeacherConfig(base_url=server.base_url, api_key_env=""))
        try:
            rows = [q.to_row() for q in [*questions, not_a_question]]
            return [await answer_record(row, client, retries=0) for row in rows]
        finally:
            await client.close()

    with ScriptedOpenAIServer(lambda body: "ChatGPT：多喝水，注意休息。") as server:
        outcomes = asyncio.run(ask_all())
    for question, outcome in zip(questions, outcomes):
        record = outcome.record
        assert record.id == question.id and record.meta["qid"] == question.meta["qid"]
        assert record.turns[-1] == {"role": "assistant", "content": "ChatGPT：多喝水，注意休息。"}
        assert record.turns[:-1] == question.turns
    assert outcomes[-1].record is None and "does not end with a question" in outcomes[-1].reason
