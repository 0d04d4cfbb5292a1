"""A real Ray head on 127.0.0.1 for tests, started with `ray start --head` and stopped alone.

`ray stop` would stop every Ray on the machine; this stops only the head it started: the
`ray start --block` process (which takes its children down on SIGTERM) and then anything left
that still runs from this head's own temp dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from huatuo_ray.runtime import free_port

__all__ = ["Head", "MetricsScraper", "environment", "free_port", "local_head"]


@dataclass
class Head:
    address: str  # GCS address, for ray.init(address=...)
    dashboard_url: str  # job API, for JobSubmissionClient / `ray job submit --address`
    env: dict[str, str]  # the client environment: token auth on
    temp_dir: str
    tmpdir: str = ""  # RAY_TMPDIR whose ray/ is temp_dir


class HeadExited(RuntimeError):
    """`ray start` ended before its dashboard answered (a port taken meanwhile, most often)."""


def _wait_for_dashboard(
    url: str, env: dict[str, str], deadline: float, proc: subprocess.Popen
) -> None:
    from ray.job_submission import JobSubmissionClient

    last: Exception | None = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise HeadExited(f"`ray start` exited with code {proc.returncode}")
        try:
            with environment(env):
                JobSubmissionClient(url).list_jobs()
            return
        except Exception as e:  # noqa: BLE001 - the dashboard is still starting
            last = e
            time.sleep(1)
    raise TimeoutError(f"dashboard at {url} did not answer: {last}")


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in this process's environment for the block, the previous values restored."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kill_leftovers(temp_dir: str) -> None:
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid_dir.name), signal.SIGKILL)


@contextlib.contextmanager
def local_head(
    num_cpus: int = 2,
    timeout: float = 120,
    node_env: dict[str, str] | None = None,
    metrics_port: int | None = None,
) -> Iterator[Head]:
    """``node_env``: the head node's own environment (as a Kubernetes Secret mounted as env vars
    would be), inherited by every job and worker on it. The temp dir is ``RAY_TMPDIR/ray`` of
    ``Head.tmpdir``: a bare ``ray.init()`` run with that ``RAY_TMPDIR`` finds this head as it
    finds a `ray start` head on the default temp dir. ``metrics_port``: the node's metrics
    endpoint (``http://127.0.0.1:PORT/metrics``). A head that exits while starting (a free port
    taken by another test's process meanwhile) is started again on new ports, three times in all."""
    for attempt in range(3):
        try:
            with _head(num_cpus, timeout, node_env, metrics_port) as head:
                yield head
            return
        except HeadExited:
            if attempt == 2:
                raise


@contextlib.contextmanager
def _head(
    num_cpus: int, timeout: float, node_env: dict[str, str] | None, metrics_port: int | None
) -> Iterator[Head]:
    tmpdir = tempfile.mkdtemp(prefix="hr-ray-", dir="/tmp")
    temp_dir = os.path.join(tmpdir, "ray")
    os.mkdir(temp_dir)
    gcs_port, dash_port = free_port(), free_port()
    env = {"RAY_AUTH_MODE": "token"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray_bin, "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(gcs_port),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash_port),
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--num-cpus", str(num_cpus),
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]  # fmt: skip
    if metrics_port is not None:
        cmd += ["--metrics-export-port", str(metrics_port)]
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 - closed below
    # Job entrypoints run `python` from the head's PATH: the venv's, as after `source .venv/bin/activate`.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env, **(node_env or {}), "PATH": path},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash_port}"
    try:
        _wait_for_dashboard(url, env, time.time() + timeout, proc)
        yield Head(f"127.0.0.1:{gcs_port}", url, env, temp_dir, tmpdir)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            # Mostly 2 s; after a Ray Train job `ray start --block` took 30 s and more to stop
            # its children. What is left when this wait ends is killed: the head is discarded.
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_leftovers(temp_dir)
        log.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


class MetricsScraper:
    """Reads a node's metrics endpoint (``ray start --metrics-export-port``), as Prometheus does,
    every second in a thread for as long as the ``with`` block runs, and keeps every label set
    seen for each ``ray_huatuo_*`` series: a job's series leave the endpoint soon after the job
    ends, so they are caught while it runs."""

    SERIES = re.compile(r"^(ray_huatuo_\w+)\{([^}]*)\}", re.M)

    def __init__(self, url: str, every_s: float = 1.0) -> None:
        self.url, self.every_s = url, every_s
        self.seen: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MetricsScraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._scrape()  # the last reports of the drivers and workers still running

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scrape()
            self._stop.wait(self.every_s)

    def _scrape(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return
        for name, labels in self.SERIES.findall(text):
            self.seen.setdefault(name, set()).add(labels)

    def missing(self, stage: str, names: list[str]) -> list[str]:
        """Those of ``names`` (without ``huatuo_``) never seen tagged with ``stage`` and a job."""
        return [
            name for name in names
            if not any(f'stage="{stage}"' in labels and re.search(r'job="\w+"', labels)
                       for labels in self.seen.get(f"ray_huatuo_{name}", set()))
        ]  # fmt: skip
