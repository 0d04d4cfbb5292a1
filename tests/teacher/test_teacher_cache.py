"""The segment cache: round trip, the old one-file-per-answer layout, a teacher client killed with
SIGKILL losing (and buying again) only what was not flushed, two writers side by side."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from huatuo_ray.teacher.cache import SEGMENTS, LegacyCache, ResponseCache, request_key
from huatuo_ray.teacher.client import TeacherClient
from tests.conftest import TEACHER_KEY, TEACHER_KEY_ENV, teacher_config
from tests.support.openai_servers import ScriptedOpenAIServer

REPO = Path(__file__).resolve().parents[2]


def answer(i: int) -> dict:
    return {"text": f"答案{i}", "usage": {"prompt_tokens": i}, "finish_reason": "stop"}


def key(i: int) -> str:
    return request_key("m", [{"role": "user", "content": f"问题{i}"}], {})


def test_round_trip_buffers_then_flushes_into_one_segment(tmp_path: Path) -> None:
    cache = ResponseCache(str(tmp_path / "c"), flush_every=4, flush_s=3600)
    for i in range(10):
        cache.put(key(i), answer(i))
    assert cache.get(key(3)) == answer(3)  # visible to its writer before any flush
    assert cache.flushes == 2  # after answers 4 and 8
    cache.close()
    segments = list((tmp_path / "c" / SEGMENTS).iterdir())
    assert len(segments) == 1 and len(segments[0].read_text().splitlines()) == 10
    again = ResponseCache(str(tmp_path / "c"))
    assert len(again) == 10 and again.get(key(7)) == answer(7) and again.get(key(11)) is None


def test_old_layout_still_reads(tmp_path: Path) -> None:
    old = LegacyCache(str(tmp_path / "c"))
    for i in range(3):
        old.put(key(i), answer(i))
    assert (tmp_path / "c" / key(1)[:2] / f"{key(1)}.json").is_file()
    cache = ResponseCache(str(tmp_path / "c"))
    assert cache.get(key(1)) == answer(1)
    assert asyncio.run(cache.aget(key(2))) == answer(2)
    assert cache.get(key(5)) is None
    cache.put(key(5), answer(5))  # new answers go to segments beside the old files
    cache.close()
    assert ResponseCache(str(tmp_path / "c")).get(key(5)) == answer(5)


WRITER = """
import asyncio, sys, time
from huatuo_ray.teacher.cache import ResponseCache
from huatuo_ray.teacher.client import TeacherClient
from tests.conftest import teacher_config
from tests.support.openai_servers import ScriptedOpenAIServer

async def ask(client):
    for i in range(25):  # one at a time: answers 1..25 arrive in order
        await client.chat([{"role": "user", "content": f"问题{i}"}])

with ScriptedOpenAIServer() as server:
    cache = ResponseCache(sys.argv[1], flush_every=10, flush_s=3600)
    asyncio.run(ask(TeacherClient(teacher_config(server.base_url), cache)))
    print("asked 25", flush=True)
    time.sleep(60)
"""


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"问题{i}"}]


def test_sigkill_loses_only_the_answers_since_the_last_flush(tmp_path: Path, monkeypatch) -> None:
    uri = str(tmp_path / "c")
    env = {**os.environ, "PYTHONPATH": str(REPO), TEACHER_KEY_ENV: TEACHER_KEY}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, uri], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "asked 25"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # Flushed at 10 and 20: those 20 stay; answers 20..24 were only buffered.
    assert len(ResponseCache(uri)) == 20
    # A line cut short by a kill is skipped, and the writers after it are unaffected.
    segment = next((tmp_path / "c" / SEGMENTS).iterdir())
    with open(segment, "a", encoding="utf-8") as f:
        f.write('{"key": "cut-sho')
    assert len(ResponseCache(uri)) == 20
    # The rerun buys again exactly the 5 answers the kill lost.
    monkeypatch.setenv(TEACHER_KEY_ENV, TEACHER_KEY)

    async def rerun(client: TeacherClient) -> None:
        for i in range(25):
            answer = await client.chat(question(i))
            assert answer.cached == (i < 20)
        await client.close()

    with ScriptedOpenAIServer() as server:
        client = TeacherClient(teacher_config(server.base_url), ResponseCache(uri))
        asyncio.run(rerun(client))
        assert server.stats.total == 5
    assert client.usage.paid == 5 and client.usage.cached == 20


def test_two_writers_keep_their_own_segments(tmp_path: Path) -> None:
    uri = str(tmp_path / "c")
    a, b = ResponseCache(uri, flush_every=3), ResponseCache(uri, flush_every=3)

    async def write(cache: ResponseCache, numbers: range) -> None:
        for i in numbers:
            await cache.aput(key(i), answer(i))
        await cache.aflush()

    async def both() -> None:
        await asyncio.gather(write(a, range(0, 20)), write(b, range(20, 40)))

    asyncio.run(both())
    segments = sorted((tmp_path / "c" / SEGMENTS).iterdir())
    assert len(segments) == 2
    for segment in segments:
        lines = [json.loads(line) for line in segment.read_text().splitlines()]
        assert len(lines) == 20  # each writer's 20 answers, whole lines, in its own file
    assert ResponseCache(uri).keys() == {key(i) for i in range(40)}
