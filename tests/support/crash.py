"""A stage killed mid-run, as a crash would end it: started in its own process group, killed
with SIGKILL (the driver and everything it started) once the test's condition holds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def kill_when(
    cmd: list[str], cwd: Path, env: dict[str, str], ready: Callable[[], bool],
    timeout: float = 300, poll_s: float = 0.5,
) -> None:  # fmt: skip
    """Run ``cmd`` until ``ready()`` holds, then SIGKILL its process group; fails the test if
    it ends first or ``timeout`` passes."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"{cmd[3]} ended before it could be killed"
            assert time.time() < deadline, f"{cmd[3]}: not ready to be killed in {timeout} s"
            time.sleep(poll_s)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone: say why above
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
