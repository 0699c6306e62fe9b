"""Running real launcher processes from tests, with an outer watchdog so nothing outlives its budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Runs cmd in its own session; on timeout kills the whole process group. Returns stdout.

    Fails the test (AssertionError with the output's tail) on a non-zero exit or a timeout.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-6000:]}") from None
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}"
    return out


def torchrun(nproc: int, script: str, *args: str, timeout: float = 300) -> str:
    """torchrun --standalone with nproc local ranks on gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), str(WORKERS / script), *args]
    return run(cmd, timeout)
