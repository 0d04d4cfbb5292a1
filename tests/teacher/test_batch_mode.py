"""``teacher.mode: batch`` against a loopback Files + Batches API (tests/support/batch_api.py).

* request files keep to the request-count and byte limits;
* a batch is looked at through validating -> in_progress -> finalizing -> completed, its answers
  land in the response cache at the batch discount, its error lines are failures with a reason;
  a batch over the service's request limit ends ``failed`` and every line is a failure;
* ``score`` in batch mode makes the same records as online mode, asking nothing online; a
  ``polish`` run killed while its batch is in progress resumes without a new batch for the same
  requests and makes the records an online run makes; expired lines go online or become
  rejects, as configured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from huatuo_ray import artifacts
from huatuo_ray.config import BatchConfig
from huatuo_ray.dialogue import Dialogue, turn
from huatuo_ray.distill.polish import PolishConfig
from huatuo_ray.distill.polish import main as polish_main
from huatuo_ray.rlmf import score
from huatuo_ray.teacher.batch import FOLDER, STATE, BatchRunner, request_files
from huatuo_ray.teacher.cache import ResponseCache, request_key
from huatuo_ray.teacher.client import TeacherFatalError, usage_counts
from huatuo_ray.teacher.stage import WorkersConfig
from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV, teacher_config
from tests.support.batch_api import BatchAPIServer
from tests.support.openai_servers import ScriptedHTTPError
from tests.support.scripted_teacher import medical_responder

REPO = Path(__file__).resolve().parents[2]
FAST = dict(poll_s=0.01, poll_max_s=0.05)


def batch_teacher(base_url: str, **batch: Any):
    return teacher_config(
        base_url,
        mode="batch",
        batch=BatchConfig(**{**FAST, **batch}),
        price_input_per_1m=2.0,
        price_output_per_1m=8.0,
    )


def chat_body(i: int) -> dict[str, Any]:
    return {"model": "scripted-teacher", "messages": [{"role": "user", "content": f"问题{i}"}]}


def test_request_files_keep_to_both_limits() -> None:
    requests = {f"k{i:02d}": chat_body(i) for i in range(10)}
    line = len(request_files({"k00": chat_body(0)}, teacher_config("http://x"))[0][1])
    by_count = request_files(requests, batch_teacher("http://x", max_requests_per_file=4))
    assert [len(keys) for keys, _ in by_count] == [4, 4, 2]
    by_bytes = request_files(requests, batch_teacher("http://x", max_bytes_per_file=3 * line + 5))
    assert [len(keys) for keys, _ in by_bytes] == [3, 3, 3, 1]
    first = json.loads(by_bytes[0][1].splitlines()[0])
    assert first == {
        "custom_id": "k00",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": chat_body(0),
    }


def test_cost_counts_the_batch_discount_and_cached_input() -> None:
    teacher = teacher_config("http://x", price_input_per_1m=2.0, price_output_per_1m=8.0,
                             price_cached_input_per_1m=1.0)  # fmt: skip
    usage = {"prompt_tokens": 1000, "completion_tokens": 500,
             "prompt_tokens_details": {"cached_tokens": 400}}  # fmt: skip
    # 600 x $2 + 400 x $1 + 500 x $8 per million = $0.0056; half of it in a batch
    assert usage_counts(usage, teacher)["cost_usd"] == pytest.approx(0.0056)
    assert usage_counts(usage, teacher, discount=0.5)["cost_usd"] == pytest.approx(0.0028)


def test_a_wrong_key_stops_batch_mode_with_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(TEACHER_KEY_ENV, "sk-wrong-key-123456")
    with BatchAPIServer(require_api_key=TEACHER_KEY) as server:
        runner = BatchRunner(batch_teacher(server.base_url), str(tmp_path), "t",
                             ResponseCache(str(tmp_path / "cache")))  # fmt: skip
        with pytest.raises(TeacherFatalError, match="HTTP 401") as caught:
            runner.submit(_requests(2), 1)
    assert "sk-wrong-key-123456" not in str(caught.value)


def _requests(n: int) -> dict[str, dict[str, Any]]:
    return {
        request_key("scripted-teacher", chat_body(i)["messages"], {}): chat_body(i)
        for i in range(n)
    }


def test_a_batch_runs_through_its_statuses_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(TEACHER_KEY_ENV, TEACHER_KEY)

    def responder(body: dict[str, Any]) -> str:
        if body["messages"][0]["content"] == "问题3":
            raise ScriptedHTTPError(400, "Invalid 'messages'", "invalid_value", "messages")
        return "答案：" + body["messages"][0]["content"]

    requests = _requests(6)
    with BatchAPIServer(responder, require_api_key=TEACHER_KEY) as server:
        cache = ResponseCache(str(tmp_path / "cache"))
        runner = BatchRunner(batch_teacher(server.base_url), str(tmp_path), "t", cache)
        runner.submit(requests, 1)
        state = json.loads((tmp_path / FOLDER / STATE).read_text())
        (batch_id,) = [b["id"] for b in state["batches"]]  # recorded before any waiting
        seen = []
        for _ in range(4):
            seen.append(runner.client.batches.retrieve(batch_id).status)
        runner.wait_and_download()
    assert seen == ["in_progress", "finalizing", "completed", "completed"]
    failing = request_key("scripted-teacher", chat_body(3)["messages"], {})
    assert runner.failed == {failing: "batch line failed: HTTP 400: Invalid 'messages'"}
    again = ResponseCache(str(tmp_path / "cache"))
    assert again.keys() == set(requests) - {failing}
    answer = again.get(request_key("scripted-teacher", chat_body(0)["messages"], {}))
    assert answer["text"] == "答案：问题0" and answer["finish_reason"] == "stop"
    # tokens as the scripted server counts them (a CJK character is one), at half price
    prompt = sum(again.get(k)["usage"]["prompt_tokens"] for k in again.keys())
    completion = sum(again.get(k)["usage"]["completion_tokens"] for k in again.keys())
    assert runner.usage.paid == 5
    assert runner.usage.cost_usd == pytest.approx((prompt * 2 + completion * 8) / 1e6 * 0.5)
    assert not list((tmp_path / FOLDER).glob("*.jsonl"))  # request files go once downloaded


def test_a_batch_over_the_request_limit_fails_every_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(TEACHER_KEY_ENV, TEACHER_KEY)
    with BatchAPIServer(max_requests_per_file=3) as server:
        runner = BatchRunner(
            batch_teacher(server.base_url, max_requests_per_file=5),
            str(tmp_path),
            "t",
            ResponseCache(str(tmp_path / "cache")),
        )
        runner.submit(_requests(5), 1)
        runner.wait_and_download()
    assert len(runner.failed) == 5
    assert set(runner.failed.values()) == {
        "batch failed: too_many_requests: The batch input file has 5 requests, more than the "
        "limit of 3."
    }
    state = json.loads((tmp_path / FOLDER / STATE).read_text())
    assert state["batches"][0]["status"] == "failed" and len(state["failed"]) == 5


# --------------------------------------------------------------------------- stages on Ray


def consultations(path: Path, n: int = 6) -> str:
    writer = artifacts.DatasetWriter(str(path))
    for i in range(n):
        question = f"我发热{i + 1}天了，还咳嗽，需要去医院吗？"
        answer = f"建议多喝水休息，发热超过{i + 2}天请就医。"
        writer.write(
            Dialogue(f"c{i}", "cmd", [turn("user", question), turn("assistant", answer)], {})
        )
    writer.finish("convert", {})
    return str(path)


def samples(path: Path) -> str:
    writer = artifacts.DatasetWriter(str(path))
    for i in range(3):
        reference = f"建议多喝水，注意休息，第{i}天如果发热不退请及时就医。"
        responses = [reference, "多喝水。", "这个问题我不清楚。"]
        meta = {"responses": responses, "reference": reference, "seed": i}
        writer.write(Dialogue(f"p{i}", "sample", [turn("user", f"发热{i}天怎么办？")], meta))
    writer.finish("sample", {})
    return str(path)


def rows_of(output: Path) -> list[dict[str, Any]]:
    return [r.to_row() for r in artifacts.read_dialogues(str(output))]


WORKERS = WorkersConfig(num_workers=1, batch_size=8, max_parse_retries=1)


@pytest.mark.slow
def test_score_in_batch_mode_makes_the_online_records(local_ray, tmp_path: Path) -> None:
    prompts = samples(tmp_path / "samples")
    with BatchAPIServer(medical_responder) as server:
        online = teacher_config(server.base_url)
        score.main(score.ScoreConfig(input=prompts, output=str(tmp_path / "s1"), teacher=online,
                                     workers=WORKERS))  # fmt: skip
        server.reset_stats()
        batch = batch_teacher(server.base_url)
        scored = score.main(
            score.ScoreConfig(
                input=prompts, output=str(tmp_path / "s2"), teacher=batch, workers=WORKERS
            )
        )
        online_calls = server.stats.total  # chat completions asked online in batch mode
    assert online_calls == 0
    assert rows_of(tmp_path / "s2") == rows_of(tmp_path / "s1") and scored["rows"] > 0
    # 3 prompts x 3 pairs x 2 orders, all in one batch of one round (pairs are independent)
    assert len(server.created) == 1 and len(server.created[0][1]) == 18
    assert scored["batch"]["requests_submitted"] == 18 and scored["batch"]["rounds"] == 1
    usage = scored["teacher"]["usage"]
    assert usage["paid"] == 18 and usage["cached"] == 18  # bought in the batch, replayed by the map


KILLED = """
import sys
from huatuo_ray.artifacts import iter_rows
from huatuo_ray.config import BatchConfig
from huatuo_ray.distill.polish import polish_record
from huatuo_ray.teacher.batch import prefetch
from tests.conftest import teacher_config
teacher = teacher_config(sys.argv[1], mode="batch", batch=BatchConfig(poll_s=0.01, poll_max_s=0.05))
rows = list(iter_rows(sys.argv[2]))
prefetch(rows, polish_record, {"retries": 1}, teacher, sys.argv[3] + "/_teacher_cache", sys.argv[3], "polish")
"""


@pytest.mark.slow
def test_a_run_killed_while_its_batch_runs_resumes_without_a_new_batch(
    local_ray, tmp_path: Path
) -> None:
    inputs, output = consultations(tmp_path / "in"), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), TEACHER_KEY_ENV: TEACHER_KEY}
    with BatchAPIServer(medical_responder) as server:
        server.hold.clear()  # the batch stays in_progress
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED, server.base_url, inputs, str(output)], env=env
        )
        try:
            deadline = time.monotonic() + 60
            while not server.created and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.3)  # a few looks at the batch in progress
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        (batch_id, submitted), = server.created  # fmt: skip
        state = json.loads((output / FOLDER / STATE).read_text())
        assert [b["id"] for b in state["batches"]] == [batch_id]
        assert server.batches[batch_id]["status"] == "in_progress"
        server.hold.set()
        manifest = polish_main(
            PolishConfig(
                input=inputs,
                output=str(output),
                teacher=batch_teacher(server.base_url),
                workers=WORKERS,
            )
        )
        created, online_calls = list(server.created), server.stats.total
        # the same inputs online, in a fresh folder: the same records
        polish_main(PolishConfig(input=inputs, output=str(tmp_path / "online"),
                                 teacher=teacher_config(server.base_url), workers=WORKERS))  # fmt: skip
    assert created == [(batch_id, submitted)] and len(submitted) == 6  # no second batch
    assert online_calls == 0 and manifest["rows"] == 6  # the batch's 6 answers, none online
    assert manifest["batch"]["batches"] == [batch_id] and manifest["teacher"]["usage"]["paid"] == 6
    assert rows_of(output) == rows_of(tmp_path / "online")


@pytest.mark.slow
@pytest.mark.parametrize("failed_lines", ["online", "reject"])
def test_expired_lines_go_online_or_to_rejects(local_ray, tmp_path: Path, failed_lines) -> None:
    inputs = consultations(tmp_path / "in")
    with BatchAPIServer(medical_responder) as server:
        server.expire_next = True  # half its lines answered, the rest expired
        manifest = polish_main(
            PolishConfig(
                input=inputs,
                output=str(tmp_path / "out"),
                teacher=batch_teacher(server.base_url, failed_lines=failed_lines),
                workers=WORKERS,
                max_reject_fraction=0.9,
            )
        )
        online = server.stats.total  # chat completions asked online
    report = manifest["batch"]
    expired = "batch line failed: batch_expired: This request could not be executed before the "
    expired += "completion window expired."
    assert report["failed_lines"] == 3 and report["failed_by_reason"] == {expired: 3}
    assert report["answered"] == 3 and len(server.created) == 1
    if failed_lines == "online":
        assert manifest["rows"] == 6 and manifest["rejects"]["count"] == 0
    else:
        assert manifest["rows"] == 3
        assert manifest["rejects"]["by_reason"] == {f"teacher failed: {expired}": 3}
    assert online == (3 if failed_lines == "online" else 0)


@pytest.mark.slow
def test_an_answer_that_does_not_parse_is_asked_again_in_the_next_round(
    local_ray, tmp_path: Path
) -> None:
    def responder(body: dict[str, Any]) -> str:
        if "发热1天" in body["messages"][-1]["content"] and "seed" not in body:
            return "<HuatuoGPT回复>："  # a role tag and nothing else: no answer to parse
        return medical_responder(body)

    with BatchAPIServer(responder) as server:
        manifest = polish_main(
            PolishConfig(
                input=consultations(tmp_path / "in"),
                output=str(tmp_path / "out"),
                teacher=batch_teacher(server.base_url),
                workers=WORKERS,
            )
        )
        online = server.stats.total
    assert [len(ids) for _, ids in server.created] == [6, 1]  # the ask-again in round 2
    assert manifest["batch"]["rounds"] == 2 and online == 0 and manifest["rows"] == 6
