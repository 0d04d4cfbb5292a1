"""Teacher stages against a hosted API's rules, end to end on a local Ray.

* ``polish`` and ``score`` with OpenAI's ``response_format`` json_schema answers, on a reasoning
  model configured for it (no temperature/top_p, max_completion_tokens);
* cut and filtered answers never become records and are counted by reason;
* a wrong key, an unknown model, an exhausted quota stop the stage in seconds with exit 1 and
  one line, the key nowhere in the output;
* a stage with every record rejected exits 1, and its rerun does not call itself complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from huatuo_ray import artifacts
from huatuo_ray.__main__ import main as cli
from huatuo_ray.data.convert import DataConfig, convert
from huatuo_ray.dialogue import Dialogue, turn
from huatuo_ray.distill.polish import PolishConfig
from huatuo_ray.distill.polish import main as polish_main
from huatuo_ray.rlmf import score
from huatuo_ray.teacher.stage import WorkersConfig, already_complete
from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV, teacher_config
from tests.support.hosted_api import QUOTA_MESSAGE, HostedAPIServer, invalid_key_message
from tests.support.openai_servers import ScriptedHTTPError, ScriptedReply
from tests.support.scripted_teacher import medical_responder

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # local Ray and Ray Data actors
REASONING = dict(model="o3-mini", temperature=None, top_p=None, reasoning_effort="low")


@pytest.fixture(scope="module")
def consultations(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> str:
    out = str(tmp_path_factory.mktemp("hosted") / "cmd")
    source = shared_datasets / "chinese_medical_dialogue_im" / "内科5000-6000_sample400.csv"
    convert(DataConfig(source="cmd_csv", input=str(source), output=out, limit=12))
    return out


def samples(path: Path) -> str:
    """A sample-stage artifact by hand: 4 prompts with 3 responses each."""
    writer = artifacts.DatasetWriter(str(path))
    for i in range(4):
        reference = f"建议多喝水，注意休息，第{i}天如果发热不退请及时就医。"
        responses = [reference, "多喝水。", "这个问题我不清楚。"]
        meta = {"responses": responses, "reference": reference, "seed": i}
        writer.write(Dialogue(f"p{i}", "sample", [turn("user", f"发热{i}天怎么办？")], meta))
    writer.finish("sample", {})
    return str(path)


def test_polish_and_score_with_json_schema_answers(
    local_ray, consultations: str, tmp_path: Path
) -> None:
    bodies: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> str:
        bodies.append(body)
        return medical_responder(body)

    with HostedAPIServer(responder, reasoning_models={"o3-mini"}) as server:
        teacher = teacher_config(
            server.base_url, structured_outputs="json_schema", max_tokens=2000, **REASONING
        )
        workers = WorkersConfig(num_workers=1, batch_size=8, max_parse_retries=1)
        polished = polish_main(
            PolishConfig(
                input=consultations,
                output=str(tmp_path / "pol"),
                teacher=teacher,
                workers=workers,
                limit=6,
            )
        )
        scored = score.main(
            score.ScoreConfig(
                input=samples(tmp_path / "samples"),
                output=str(tmp_path / "prefs"),
                teacher=teacher,
                workers=workers,
            )
        )
    # nothing refused: the strict schemas passed the server's checks, no field was unknown
    assert server.stats.by_status == {200: server.stats.total}
    assert {b["response_format"]["json_schema"]["name"] for b in bodies} == {"answer", "ratings"}
    assert polished["rows"] == 6 and polished["rejects"]["count"] == 0
    for record in artifacts.read_dialogues(str(tmp_path / "pol")):
        assert not record.turns[-1]["content"].startswith("{")  # the text, not the JSON
    fb = scored["feedback"]
    assert fb["pairs"] == 12 and fb["unparseable"] == 0 and fb["kept"] == scored["rows"] > 0


def _target(body: dict[str, Any], every: int, slot: int) -> bool:
    text = body["messages"][-1]["content"]
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % every == slot


def test_cut_and_filtered_answers_are_counted_rejects(
    local_ray, consultations: str, tmp_path: Path
) -> None:
    def responder(body: dict[str, Any]) -> Any:
        if _target(body, 3, 0):
            return ScriptedReply(None, "content_filter")  # Azure's reply to some medical text
        if _target(body, 3, 1):
            return ScriptedReply(medical_responder(body), "length")
        return medical_responder(body)

    def spent_now_and_then(answered: int) -> dict[str, str]:  # paces the shared limiter actor
        left = "0" if answered % 5 == 4 else "50"
        return {"x-ratelimit-remaining-requests": left, "x-ratelimit-reset-requests": "100ms"}

    with HostedAPIServer(responder, rate_limit=spent_now_and_then) as server:
        manifest = polish_main(
            PolishConfig(
                input=consultations,
                output=str(tmp_path / "pol"),
                teacher=teacher_config(server.base_url, max_tokens=300),
                workers=WorkersConfig(num_workers=1, batch_size=8, max_parse_retries=2),
                max_reject_fraction=0.9,
            )
        )
        bodies_per_kind = server.stats.total
    by_reason = manifest["rejects"]["by_reason"]
    filtered = by_reason.get("answer filtered by the teacher's content filter", 0)
    cut = by_reason.get("answer cut at max_tokens=N", 0)
    assert filtered > 0 and cut > 0 and filtered + cut == manifest["rejects"]["count"]
    assert manifest["rows"] == 12 - filtered - cut
    assert bodies_per_kind == manifest["rows"] + 2 * (filtered + cut)  # each asked again once
    rejects = artifacts.read_rejects(str(tmp_path / "pol"))
    assert {r["reason"] for r in rejects} >= {"answer cut at max_tokens=600"}
    records = artifacts.read_dialogues(str(tmp_path / "pol"))
    assert {r.meta["from_id"] for r in records}.isdisjoint({r["where"] for r in rejects})


def write_config(
    path: Path, base_url: str, output: Path, inputs: str, batch_size: int = 4, **teacher: Any
) -> str:
    values = {
        "input": inputs,
        "output": str(output),
        "teacher": {
            "base_url": base_url,
            "model": "scripted-teacher",
            "api_key_env": TEACHER_KEY_ENV,
            "timeout_s": 5,
            "max_retries": 6,
            "backoff_base_s": 0.5,
            **teacher,
        },
        "workers": {"num_workers": 1, "batch_size": batch_size},
    }
    path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("teacher", "said"),
    [
        ({"model": "gpt-9"}, "HTTP 404 (model_not_found): The model `gpt-9` does not exist"),
        ({"model": "quota"}, "HTTP 429 (insufficient_quota): You exceeded your current quota"),
    ],
)
def test_unknown_model_and_quota_stop_the_stage_in_seconds(
    local_ray, consultations: str, tmp_path: Path, capfd, teacher: dict, said: str
) -> None:
    def responder(body: dict[str, Any]) -> str:
        raise ScriptedHTTPError(429, QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota")

    with HostedAPIServer(responder, chat_models={"scripted-teacher", "quota"}) as server:
        cfg = write_config(
            tmp_path / "c.yaml", server.base_url, tmp_path / "out", consultations, 1, **teacher
        )
        started = time.monotonic()
        code = cli(["polish", "--config", cfg])
        elapsed = time.monotonic() - started
        requests = server.stats.total
    out, err = capfd.readouterr()
    assert code == 1 and elapsed < 30
    # Ray Data runs up to 4 batches (of 1 here) at once per worker: those may be in flight when
    # the first answer comes; after it, nothing is asked (and nothing retried).
    assert requests <= 4
    failed = [line for line in err.splitlines() if line.startswith("polish failed")]
    assert len(failed) == 1 and said in failed[0]
    assert TEACHER_KEY not in out + err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_wrong_key_stops_the_cli_with_exit_1_and_no_key_anywhere(
    consultations: str, tmp_path: Path
) -> None:
    """The real command in its own process: exit status, output, and time to stop."""
    wrong = "sk-wrong-but-secret-7731"

    def responder(body: dict[str, Any]) -> str:
        raise ScriptedHTTPError(
            401, invalid_key_message(wrong), "invalid_request_error", "invalid_api_key"
        )

    env = {**os.environ, TEACHER_KEY_ENV: wrong, "PYTHONUNBUFFERED": "1"}
    with HostedAPIServer(responder) as server:
        cfg = write_config(tmp_path / "c.yaml", server.base_url, tmp_path / "out", consultations, 1)
        command = [sys.executable, "-m", "huatuo_ray", "polish", "--config", cfg,
                   "cluster.address=local", "cluster.num_cpus=2"]  # fmt: skip
        started = time.monotonic()
        res = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=180)  # fmt: skip
        elapsed = time.monotonic() - started
        requests = server.stats.total
    output = res.stdout + res.stderr
    assert res.returncode == 1, output[-3000:]
    assert "polish failed: the teacher 'scripted-teacher'" in res.stderr
    assert "HTTP 401 (invalid_api_key): Incorrect API key provided" in res.stderr
    for piece in (wrong, wrong[-4:], "****"):
        assert piece not in output
    assert "Traceback" not in res.stderr
    assert requests <= 4 and elapsed < 60  # Ray's start-up is most of it


def test_all_rejected_exits_1_and_rerun_is_not_complete(
    local_ray, consultations: str, tmp_path: Path, capfd
) -> None:
    def responder(body: dict[str, Any]) -> Any:
        return ScriptedReply(None, "content_filter")

    out = tmp_path / "out"
    with HostedAPIServer(responder) as server:
        cfg = write_config(tmp_path / "c.yaml", server.base_url, out, consultations)
        assert cli(["polish", "--config", cfg, "workers.max_parse_retries=1"]) == 1
        err = capfd.readouterr().err
        assert "12 of 12 inputs rejected, more than max_reject_fraction=0.5" in err
        assert "12 x answer filtered by the teacher's content filter" in err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "failed" and manifest["rows"] == 0
        assert len((out / artifacts.REJECTS).read_text().splitlines()) == 12
        with pytest.raises(artifacts.ArtifactError, match="records a failed run"):
            artifacts.read_dialogues(str(out))  # no later stage takes it as input
        paid = server.stats.total
        assert paid == 24  # each asked again once
    # The rerun check does not take it for complete: a rerun runs again (from the cache), and
    # clears the failed run's files first (the cache stays).
    assert already_complete(str(out), overwrite=False) is None
    assert not (out / "manifest.json").exists() and (out / "_teacher_cache").is_dir()
