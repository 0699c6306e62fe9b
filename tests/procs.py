"""Running real launcher processes from tests, with an outer watchdog so nothing outlives its budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"


def run_all(cmds: list[list[str]], timeout: float, envs: list[dict[str, str]] | None = None,
            expect_failure: bool = False, cwd: Path = ROOT) -> list[str]:
    """Starts several commands at once (e.g. two node agents), each in its own session, and waits.

    On timeout every process group gets SIGTERM (so that launchers run their cleanup), then SIGKILL
    after 20 s. Fails the test (AssertionError with the output's tail)
    on a non-zero exit or a timeout. Returns each command's output (stdout and stderr).
    """
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(cmd, cwd=cwd, env={**base, **(envs[i] if envs else {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for i, cmd in enumerate(cmds)]
    outs: list[str] = []
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        tails = "\n".join(p.communicate()[0][-3000:] for p in procs)
        raise AssertionError(f"timed out after {timeout}s: {cmds}\n{tails}") from None
    for cmd, p, out in zip(cmds, procs, outs, strict=True):
        if expect_failure:
            assert p.returncode != 0, f"exit 0 although a failure was planted: {' '.join(cmd)}\n{out[-3000:]}"
        else:
            assert p.returncode == 0, f"exit {p.returncode}: {' '.join(cmd)}\n{out[-6000:]}"
    return outs


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
        expect_failure: bool = False, cwd: Path = ROOT) -> str:
    """One command under the watchdog of run_all; returns its output."""
    return run_all([cmd], timeout, [env or {}], expect_failure, cwd)[0]


def torchrun(nproc: int, script: str | Path, *args: str, timeout: float = 300) -> str:
    """torchrun --standalone with nproc local ranks on gloo; a bare name is a tests/workers script."""
    path = script if isinstance(script, Path) else WORKERS / script
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), str(path), *args]
    return run(cmd, timeout)
