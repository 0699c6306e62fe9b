"""Checkpoints: any layout loads any other's, a killed save is harmless, resume is exact, and an
elastic torchrun job with a killed rank restarts from its checkpoint and ends where an uninterrupted
run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ROOT, WORKERS, run, torchrun

LM_ARGS = ["--eval-every", "30", "--eval-batches", "1", "--batch-size", "4", "--seq-len", "32",
           "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--no-plots", "--log-every", "100"]
TRAIN = ROOT / "examples" / "train_lm.py"


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_checkpoint_saved_at_ep4_loads_at_other_layouts(tmp_path: Path) -> None:
    """ep 4 -> ep 1, ep 2, ep 2 x dp 2, ep 1 x dp 2: identical weights and outputs, and training
    continued from it (Adam moments following their experts) matches; the single-device export
    imports into each layout too."""
    assert "OK save" in torchrun(4, "checkpoint_layouts.py", "save", str(tmp_path), "--ep-size", "4")
    for world, ep_size in [(1, 1), (2, 2), (4, 2), (2, 1)]:
        out = torchrun(world, "checkpoint_layouts.py", "load", str(tmp_path), "--ep-size", str(ep_size))
        assert f"OK load with {world} ranks, ep_size {ep_size}" in out, out[-3000:]


def test_save_killed_midway_leaves_latest_on_the_previous_checkpoint(tmp_path: Path) -> None:
    worker = [sys.executable, str(WORKERS / "killed_save.py"), str(tmp_path)]
    proc = subprocess.run([*worker, "first"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "OK killed save" in run([*worker, "second"], timeout=300)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """30 steps on 2 ranks (ep 2) without interruption, checkpointing every 5 steps."""
    out = tmp_path_factory.mktemp("straight")
    torchrun(2, TRAIN, "--steps", "30", "--save-every", "5", *LM_ARGS, "--out", str(out))
    return records(out)


def test_exact_resume(straight_run: list[dict], tmp_path: Path) -> None:
    """12 steps, stop, resume, 18 more == 30 straight, bit for bit on CPU (same layout)."""
    args = ["--save-every", "6", *LM_ARGS, "--out", str(tmp_path)]
    torchrun(2, TRAIN, "--steps", "12", *args)
    out = torchrun(2, TRAIN, "--steps", "30", "--resume", *args)
    assert "resumed from" in out and "step_00000012" in out
    resumed = records(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, 31))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight_run]
    assert resumed[-1]["val_loss"] == straight_run[-1]["val_loss"]


def test_elastic_restart_after_a_killed_rank(straight_run: list[dict], tmp_path: Path) -> None:
    """torchrun --max-restarts 1: SIGKILL one worker mid-run; the job restarts from the last
    checkpoint and ends with the uninterrupted run's losses (bit for bit)."""
    import psutil

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", str(TRAIN), "--steps", "30", "--save-every", "5", "--resume", *LM_ARGS,
           "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed, deadline = None, time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            metrics = tmp_path / "metrics.jsonl"
            if killed is None and metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
                workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                           if str(TRAIN) in " ".join(c.cmdline())]
                workers[-1].send_signal(signal.SIGKILL)
                killed = len(metrics.read_text().splitlines())
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = proc.stdout.read() if proc.stdout else ""
    assert killed is not None, output[-3000:]
    assert proc.returncode == 0, output[-4000:]
    assert "resumed from" in output, output[-3000:]
    assert [r["loss"] for r in records(tmp_path)] == [r["loss"] for r in straight_run]
