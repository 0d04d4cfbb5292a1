"""Shared fixtures. Real samples of the public datasets live in ../shared/datasets (read-only)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from huatuo_ray.runtime import LOCAL_TRAIN_POLL_S, PREEMPTION_WATCHER_ENV, TRAIN_POLL_ENV
from tests.ray_head import Head

# Ray 2.60 turns token authentication on for new clusters; a client sends the token only when
# RAY_AUTH_MODE=token is set, and Ray reads it once per process, so it is set before Ray loads.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Every Ray the tests start (local ones, `ray start` heads, subprocess stages) polls its Ray Train
# workers as a stage's own local Ray does (huatuo_ray.runtime), not every 2 s.
os.environ.setdefault(TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S)
# No node of the tests' Rays is ever drained: no preemption-watcher actor per Ray Train run (Ray
# Train passes the setting from the driver to its controller).
os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real dataset samples not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with a tokenizer trained on the bundled corpus, built once."""
    from huatuo_ray.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(str(tmp_path_factory.mktemp("tiny") / "model"))


class InBackground:
    """A context manager entered in a thread of its own, so that what it starts (a server
    taking seconds to come up) starts while other tests run; :meth:`value` waits for it."""

    def __init__(self, manager: Any) -> None:
        self._ready, self._stop = threading.Event(), threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(manager,), daemon=True)
        self._thread.start()

    def _run(self, manager: Any) -> None:
        try:
            with manager as value:
                self._value = value
                self._ready.set()
                self._stop.wait()
        except BaseException as e:  # noqa: BLE001 - raised again in the test that waits
            self._error = e
            self._ready.set()

    def value(self, timeout: float = 600) -> Any:
        if not self._ready.wait(timeout):
            raise TimeoutError(f"not started in {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


@pytest.fixture(scope="session", autouse=True)
def _start_vllm_tiny_early(request: pytest.FixtureRequest) -> Iterator[InBackground | None]:
    """When the session has tests that use ``vllm_tiny``, its server starts with the session
    (vLLM's start is ~14 s of two imports on 2 cores), beside the tests that come before them."""
    if not any("vllm_tiny" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    from huatuo_ray.inference.openai_server import vllm_server

    server = InBackground(vllm_server(request.getfixturevalue("tiny_model_dir")))
    yield server
    server.close()


@pytest.fixture(scope="session")
def vllm_tiny(_start_vllm_tiny_early: InBackground | None, tiny_model_dir: str):
    """vLLM's OpenAI-compatible server on the tiny model (model name ``tiny-teacher``), started
    with the session (``_start_vllm_tiny_early``) and shared by the tests that need a real vLLM
    teacher (idle, it uses ~1% CPU)."""
    if _start_vllm_tiny_early is not None:
        yield _start_vllm_tiny_early.value()
        return
    from huatuo_ray.inference.openai_server import vllm_server

    with vllm_server(tiny_model_dir) as base_url:  # a test asked for it by name
        yield base_url


@pytest.fixture(scope="session")
def vllm_check(local_ray):
    """A Ray actor that imports vLLM once for the session and builds a real ``vllm.LLM`` on each
    folder a test asks it to check (tests/support/vllm_check.py)."""
    import ray

    from tests.support.vllm_check import VLLMCheck

    # vLLM's model worker in the actor's own process (as vllm_worker_in_engine_process does).
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    actor = ray.remote(VLLMCheck).options(num_cpus=0, runtime_env={"env_vars": env}).remote()
    yield actor
    ray.kill(actor)


TEACHER_KEY = "sk-test-teacher-secret-42"
TEACHER_KEY_ENV = "HUATUO_TEST_KEY"


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the in-process stage tests. Its workers inherit the teacher key from
    this process's environment, as a cluster's workers inherit it from theirs."""
    import ray

    os.environ[TEACHER_KEY_ENV] = TEACHER_KEY
    if not ray.is_initialized():
        # address="local": a fresh Ray of its own, even while another test runs a `ray start` head.
        # 4 logical CPUs on 2 cores: the tests' stages ask fractions and take turns; the margin
        # keeps a Ray Train stage (whole CPUs, waiting until they are free) from waiting forever
        # on an actor that an earlier test's stopped stage has not yet let go.
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


# A node's metrics reach its endpoint every second instead of every 10 s (Ray's default).
FAST_METRICS = {"RAY_metrics_report_interval_ms": "1000"}


@dataclass
class ClusterHead(Head):
    """The tests' shared `ray start` head (see :func:`cluster_head`): a :class:`Head` with its
    node's metrics endpoint and its nodes' HUATUO_ROOT."""

    metrics_url: str = ""  # the node's Prometheus endpoint
    root: Path = Path()  # where submitted presets' relative outputs land

    def stage_env(self) -> dict[str, str]:
        """The environment of a stage run directly next to the head: it joins the head."""
        return {**os.environ, **self.env, **FAST_METRICS, "RAY_ADDRESS": self.address,
                "PYTHONUNBUFFERED": "1"}  # fmt: skip


@pytest.fixture(scope="session")
def cluster_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHead]:
    """One real `ray start` head (4 logical CPUs) shared by the tests that submit jobs to a
    cluster or run stages against one, instead of a head each (~8 s to start, and as many Ray
    processes for every job as on any cluster). Its nodes' environment holds what a cluster's
    would: the teacher key (as a Kubernetes Secret would put it there), HUATUO_ROOT, and a
    metrics endpoint reporting every second. Each test finds its own jobs by submission id or
    output path; jobs and session logs of the others stay on it, as on a real cluster."""
    from tests.ray_head import free_port, local_head

    root = tmp_path_factory.mktemp("huatuo-root")
    port = free_port()
    node_env = {TEACHER_KEY_ENV: TEACHER_KEY, "HUATUO_ROOT": str(root), **FAST_METRICS}
    with local_head(num_cpus=4, node_env=node_env, metrics_port=port) as head:
        yield ClusterHead(**vars(head), metrics_url=f"http://127.0.0.1:{port}/metrics", root=root)


@pytest.fixture(autouse=True)
def _release_actors_of_failed_stages(request: pytest.FixtureRequest):
    """After a test on the shared local Ray, collect the cycles an in-process error leaves (a
    stage stopped by its teacher: Ray's error keeps its actor pool's handles, and so their
    CPUs, until the cycle is collected), so the next test's Ray Train finds its CPUs free."""
    yield
    if "local_ray" in request.fixturenames:
        import gc

        gc.collect()


class RecordingResponder:
    """The scripted teacher, keeping every request body it answered (for leak checks)."""

    def __init__(self) -> None:
        import threading

        from tests.support.scripted_teacher import medical_responder

        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        self._answer = medical_responder

    def __call__(self, body: dict) -> str:
        with self._lock:
            self.bodies.append(body)
        return self._answer(body)


@pytest.fixture()
def faulty_teacher():
    """(server, proxy, responder): the scripted teacher behind a proxy faulting 25% of requests."""
    from tests.support.openai_servers import FaultyProxy, ScriptedOpenAIServer

    responder = RecordingResponder()
    with ScriptedOpenAIServer(responder, require_api_key=TEACHER_KEY) as server:
        with FaultyProxy(server.base_url, seed=11, fault_rate=0.25, hang_s=3.0) as proxy:
            yield server, proxy, responder


def teacher_config(base_url: str, **overrides):
    from huatuo_ray.config import TeacherConfig

    values = dict(
        base_url=base_url,
        model="scripted-teacher",
        api_key_env=TEACHER_KEY_ENV,
        timeout_s=1.0,
        max_retries=20,
        backoff_base_s=0.02,
        backoff_max_s=0.1,
    )
    values.update(overrides)
    return TeacherConfig(**values)
