"""Evaluation stages on real samples: judge (stored answers and a model's answers), consult, the
doctor export/import round trip, and the report. The position-switch bookkeeping is checked with
judges that know which answer is whose, and with a judge that only ever prefers position 1."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import pytest

from huatuo_ray import artifacts
from huatuo_ray.config import ModelConfig, TeacherConfig
from huatuo_ray.data.convert import DataConfig, convert
from huatuo_ray.eval import benchmark, consult, doctors, judge, report
from huatuo_ray.eval.tally import tally
from huatuo_ray.inference.generation import EngineConfig
from huatuo_ray.teacher.stage import WorkersConfig
from tests.conftest import teacher_config
from tests.support.openai_servers import ScriptedOpenAIServer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ASSISTANT = re.compile(r"\[Assistant (\d)\]\n(.*?)\n\[End of Assistant \d\]", re.S)


def test_a_outcome_credits_the_model_in_each_position() -> None:
    assert judge.a_outcome("better", a_first=True) == "win"
    assert judge.a_outcome("better", a_first=False) == "loss"  # B was Assistant 1 and won
    assert judge.a_outcome("worse", a_first=True) == "loss"
    assert judge.a_outcome("worse", a_first=False) == "win"
    assert judge.a_outcome("equal", a_first=False) == "tie"


def test_tally_by_hand() -> None:
    table = tally([("x", "win"), ("x", "loss"), ("y", "tie"), ("y", "win"), ("y", "inconsistent")])
    assert list(table) == ["x", "y", "overall"]
    assert table["y"] == {"win": 1, "tie": 1, "loss": 0, "inconsistent": 1, "n": 2,
                          "win_rate": 0.5, "tie_rate": 0.5, "loss_rate": 0.0}  # fmt: skip
    assert table["overall"]["n"] == 4 and table["overall"]["win_rate"] == 0.5


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval-data")
    inst = shared_datasets / "huatuogpt2_eval" / "huatuo100_inst"
    sources = {
        "gpt4": ("huatuo_answers", inst / "GPT4.json"),
        "huatuo2": ("huatuo_answers", inst / "HuatuoGPT2-7B.json"),
        "questions": ("kuake_qic", shared_datasets / "huatuogpt_eval" / "KUAKE-QIC_100.json"),
        "cases": ("meddialog_cases", shared_datasets / "huatuogpt_eval" / "Med-dialog_100.json"),
    }
    for name, (source, path) in sources.items():
        convert(DataConfig(source=source, input=str(path), output=str(root / name)))
    return {name: str(root / name) for name in sources}


def answers_of(folder: str) -> set[str]:
    from huatuo_ray import artifacts

    return {r.turns[-1]["content"] for r in artifacts.read_dialogues(folder)}


def knowing_judge(a_answers: set[str]):
    """Prefers whichever response is A's, wherever it is shown."""

    def respond(body: dict) -> str:
        blocks = dict(ASSISTANT.findall(body["messages"][-1]["content"]))
        one_is_a = any(answer in blocks["1"] for answer in a_answers)
        return "Some analysis.\n" + (
            "Assistant 1 is better than Assistant 2" if one_is_a
            else "Assistant 1 is worse than Assistant 2"
        )  # fmt: skip

    return respond


def judge_config(data: dict[str, str], out: Path, base_url: str, **kw) -> judge.JudgeConfig:
    fields = dict(
        a=judge.Candidate(name="GPT-4", answers=data["gpt4"]),
        b=judge.Candidate(name="HuatuoGPT-II", answers=data["huatuo2"]),
        output=str(out),
        match_on="meta.qid",
        category="meta.label",
        limit=24,
        teacher=teacher_config(base_url),
        workers=WorkersConfig(num_workers=1, batch_size=8),
    )
    fields.update(kw)
    return judge.JudgeConfig(**fields)


def test_judge_credits_swapped_verdicts_to_the_right_model(
    eval_data, tmp_path: Path, local_ray
) -> None:
    a_answers = answers_of(eval_data["gpt4"])
    with ScriptedOpenAIServer(knowing_judge(a_answers)) as server:
        manifest = judge.main(judge_config(eval_data, tmp_path / "j", server.base_url))
    results = manifest["results"]
    overall = results["table"]["overall"]
    # A won every pair, shown first or second: the switch was undone correctly.
    assert overall["win"] == 24 and overall["loss"] == overall["tie"] == 0
    assert 0 < results["a_shown_first"] < 24
    assert len(results["table"]) > 2  # KUAKE-QIC intents, then overall
    from huatuo_ray import artifacts

    records = list(artifacts.read_dialogues(str(tmp_path / "j")))
    assert {r.meta["a_first"] for r in records} == {True, False}
    assert all(r.meta["verdicts"][0]["a"] == "win" for r in records)
    assert "GPT-4 vs HuatuoGPT-II" in (tmp_path / "j" / "table.md").read_text()


def test_judge_both_orders_exposes_a_position_biased_judge(
    eval_data, tmp_path: Path, local_ray
) -> None:
    def first_wins(body: dict) -> str:
        return "Assistant 1 is better than Assistant 2"

    with ScriptedOpenAIServer(first_wins) as server:
        once = judge.main(judge_config(eval_data, tmp_path / "once", server.base_url))
        both = judge.main(
            judge_config(eval_data, tmp_path / "both", server.base_url, both_orders=True)
        )
    table = once["results"]["table"]["overall"]
    # One order: A wins exactly when it was shown first.
    assert table["win"] == once["results"]["a_shown_first"]
    assert table["win"] + table["loss"] == 24
    # Both orders: the judge contradicts itself on every pair; nothing is counted.
    overall = both["results"]["table"]["overall"]
    assert overall["inconsistent"] == 24 and overall["n"] == 0


def vllm_teacher(base_url: str, **kw) -> TeacherConfig:
    values = dict(base_url=base_url, model="tiny-teacher", api_key_env="",
                  structured_outputs=True, max_tokens=200, timeout_s=60)  # fmt: skip
    values.update(kw)
    return TeacherConfig(**values)


@pytest.mark.vllm
def test_judge_models_with_a_vllm_teacher(
    eval_data, tiny_model_dir: str, tmp_path: Path, local_ray, vllm_tiny: str
) -> None:
    """The tiny model answers KUAKE-QIC questions (HF generate) for both sides; vLLM's server
    judges with structured outputs, so every verdict parses."""
    tiny = judge.Candidate(name="tiny", model=tiny_model_dir)
    common = dict(questions=eval_data["questions"], max_new_tokens=16,
                  engine=EngineConfig(backend="hf"), teacher=vllm_teacher(vllm_tiny))  # fmt: skip
    manifest = judge.main(judge_config(
        eval_data, tmp_path / "model", vllm_tiny, a=tiny,
        b=judge.Candidate(name="tiny-again", model=tiny_model_dir), limit=6, **common))  # fmt: skip
    assert manifest["results"]["pairs"] == 6 and manifest["rows"] == 6
    assert manifest["results"]["table"]["overall"]["n"] == 6
    # Against GPT-4's stored answers, matched by question id.
    stored = judge.main(judge_config(eval_data, tmp_path / "stored", vllm_tiny, a=tiny, limit=2,
                                     **common))  # fmt: skip
    assert stored["rows"] + stored["rejects"]["count"] == 2


@pytest.mark.vllm
def test_consult_with_a_vllm_patient_and_doctor(
    eval_data, tmp_path: Path, local_ray, vllm_tiny: str
) -> None:
    config = consult.ConsultConfig(
        cases=eval_data["cases"], output=str(tmp_path / "consult"), name="tiny", limit=4,
        doctor=vllm_teacher(vllm_tiny, structured_outputs=False, max_tokens=24),
        teacher=vllm_teacher(vllm_tiny), max_turns=2,
        workers=WorkersConfig(num_workers=1, batch_size=4),
    )  # fmt: skip
    manifest = consult.main(config)
    assert manifest["rows"] + manifest["rejects"]["count"] == 4 and manifest["rows"] >= 3
    from huatuo_ray import artifacts

    for record in artifacts.read_dialogues(config.output):
        assert [t["role"] for t in record.turns][:2] == ["user", "assistant"]
        assert record.meta["department"] and record.meta["doctor"] == "tiny"
        # The patient never sees the doctor's private diagnosis: only the case was given.
        assert record.meta["ended"] in ("goodbye", "turn_limit")


@pytest.mark.vllm
@pytest.mark.cluster
@pytest.mark.system
def test_consult_serves_the_doctor_from_an_actor_on_the_second_node(
    eval_data, tiny_model_dir: str, tmp_path: Path
) -> None:
    """Two-node Cluster; only the second node has the resource the doctor's actor asks for. The
    stage's workers reach it at that node's address, and it is stopped when the stage ends."""
    import subprocess
    import sys
    import urllib.request

    out = tmp_path / "consult-2nodes"
    res = subprocess.run(
        [sys.executable, "-m", "tests.consult_two_nodes", eval_data["cases"], tiny_model_dir,
         str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("MANIFEST "))
    manifest = json.loads(line.removeprefix("MANIFEST "))
    assert manifest["rows"] + manifest["rejects"]["count"] == 3 and manifest["rows"] >= 2
    where = manifest["doctor_server"]
    assert where["node_id"] == manifest["second_node"]
    assert where["base_url"].startswith(f"http://{where['node_ip']}:")
    with pytest.raises(OSError):  # stopped with the stage
        urllib.request.urlopen(where["base_url"].removesuffix("/v1") + "/health", timeout=5)
    for record in artifacts.read_dialogues(str(out)):
        assert [t["role"] for t in record.turns][:2] == ["user", "assistant"]


def test_doctor_export_hides_the_key_and_import_unscrambles_votes(
    eval_data, tmp_path: Path, local_ray
) -> None:
    a_answers = answers_of(eval_data["gpt4"])
    with ScriptedOpenAIServer(knowing_judge(a_answers)) as server:
        judge.main(judge_config(eval_data, tmp_path / "j", server.base_url))
    raters, private = tmp_path / "raters", tmp_path / "private"
    doctors.export_main(doctors.DoctorExportConfig(
        pairs=str(tmp_path / "j"), output=str(raters), key_output=str(private), n=10))  # fmt: skip
    assert sorted(p.name for p in raters.iterdir()) == ["export.json", "form.html", "pairs.csv"]
    shared = (raters / "pairs.csv").read_text(encoding="utf-8-sig") + (
        raters / "form.html"
    ).read_text()
    assert "GPT-4" not in shared and "HuatuoGPT-II" not in shared and "a_is_1" not in shared
    items = list(
        csv.DictReader(io.StringIO((raters / "pairs.csv").read_text(encoding="utf-8-sig")))
    )
    assert len(items) == 10
    # A rater who always prefers GPT-4's answer, wherever it was put; plus two broken rows.
    votes = ["item,vote"]
    for it in items:
        one_is_a = any(answer.strip() in it["response_1"] for answer in a_answers)
        votes.append(f"{it['item']},{'1' if one_is_a else '2'}")
    votes += ["nope,1", f"{items[0]['item']},maybe"]
    (tmp_path / "votes.csv").write_text("\n".join(votes) + "\n")
    results = doctors.import_main(doctors.DoctorImportConfig(
        votes=[str(tmp_path / "votes.csv")], key=str(private / "key.json"),
        output=str(tmp_path / "doctors")))  # fmt: skip
    assert results["table"]["overall"]["win"] == 10 and results["rejected"] == 2
    rejects = (tmp_path / "doctors" / "rejects.jsonl").read_text()
    assert "votes.csv:12" in rejects and "votes.csv:13" in rejects
    with pytest.raises(ValueError, match="key_output"):
        doctors.DoctorExportConfig(pairs="x", output=str(raters), key_output=str(raters))


def test_report_renders_tables_and_every_image_it_references(
    eval_data, tiny_model_dir: str, tmp_path: Path, local_ray
) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with ScriptedOpenAIServer(knowing_judge(answers_of(eval_data["gpt4"]))) as server:
        judge.main(judge_config(eval_data, tmp_path / "j", server.base_url))
    bench = benchmark.main(benchmark.BenchmarkConfig(
        sets=[benchmark.BenchmarkSet(name="GPT-4 answers", path=eval_data["gpt4"])],
        output=str(tmp_path / "bench"), model=ModelConfig(path=tiny_model_dir),
        engine=EngineConfig(backend="hf"), max_new_tokens=8, limit=4))  # fmt: skip
    assert bench["counts"]["GPT-4 answers"]["answered"] == 4
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        for step in range(1, 6):
            writer.add_scalar("ppo/reward_mean", step * 0.5, step)
            writer.add_scalar("ppo/kl", step * 0.1, step)
    made = report.main(report.ReportConfig(
        output=str(tmp_path / "report"), benchmarks=[str(tmp_path / "bench")],
        comparisons=[report.Section("Single-turn (table 4)", str(tmp_path / "j"))],
        training=[report.Section("PPO", str(tmp_path / "tb"))], models=[tiny_model_dir]))  # fmt: skip
    assert made["comparisons"] == 1 and made["training"] == 1
    page = (tmp_path / "report" / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert page.count("<table>") == 2 and "GPT-4 answers" in page and "BLEU-1" in page
    md = (tmp_path / "report" / "report.md").read_text()
    for target in re.findall(r"\]\(([^)]+)\)", md):
        assert (tmp_path / "report" / target).exists(), target
    assert json.loads((tmp_path / "report" / "report.json").read_text())["images"]
