"""The one-machine cluster (launch/netns_cluster.sh): real torchrun agents in network namespaces,
the hierarchical exchange across them, and cleanup after success, failure and Ctrl-C.

Needs root and iproute2; skipped elsewhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ROOT, WORKERS, run

SCRIPT = ROOT / "launch" / "netns_cluster.sh"
# Namespace prefixes unique to this run: a run killed before its cleanup leaves namespaces behind,
# and the launcher rightly refuses a prefix that exists, so a fixed prefix would poison later runs.
RUN = f"ep{os.getpid() % 100000}t"


def stop(proc: subprocess.Popen[str], grace: float = 30.0) -> None:
    """Ends a launcher still running: SIGTERM first (its trap removes the namespaces), SIGKILL after
    ``grace`` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    probe = subprocess.run(["ip", "netns", "add", f"epprobe{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"epprobe{os.getpid()}"], check=False)
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def cluster(prefix: str, *args: str, port: int = 29611, options: tuple[str, ...] = ()) -> list[str]:
    """The launcher's command: 2 nodes x 2 ranks on 1 Gbit/s links, then ``options``, then the script."""
    return ["bash", str(SCRIPT), "--nodes", "2", "--nproc-per-node", "2", "--rate", "1gbit",
            "--prefix", prefix, "--subnet", "10.78.0", "--port", str(port), "--python", sys.executable,
            *options, "--", *args]


def test_hierarchical_exchange_across_namespaces(tmp_path: Path) -> None:
    """2 nodes x 2 ranks over tbf-limited links: the hierarchical exchange equals the reference and
    the flat exchange; the link counters saw traffic; nothing is left behind."""
    stats = tmp_path / "links.jsonl"
    worker = [str(WORKERS / "ep_equivalence.py"), "--ep-size", "4", "--exchange", "hierarchical",
              "--cases", "topk_k2_capacity_drops", "deepseek_v3_dropless_uneven"]
    out = run(cluster(RUN + "1", *worker, options=("--stats", str(stats))), timeout=400)
    assert "[node0] ALL OK 3 under torchrun with 4 ranks" in out, out[-3000:]
    assert len(stats.read_text().splitlines()) == 2 and '"tx_bytes"' in stats.read_text()
    assert namespaces(RUN + "1") == []


def test_failure_exits_nonzero_and_cleans_up(tmp_path: Path) -> None:
    failing = tmp_path / "fail.py"
    failing.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    out = run(cluster(RUN + "2", str(failing), port=29612), timeout=240, expect_failure=True)
    assert "[node" in out
    assert namespaces(RUN + "2") == []


def test_ctrl_c_cleans_up(tmp_path: Path) -> None:
    sleeper = tmp_path / "sleep.py"
    sleeper.write_text("import time\ntime.sleep(300)\n")
    proc = subprocess.Popen(cluster(RUN + "3", str(sleeper), port=29613), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(namespaces(RUN + "3")) < 3 and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # the agents are up
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) != 0
    finally:
        stop(proc)
    assert namespaces(RUN + "3") == []


def test_scaling_command_bytes_match_the_links(tmp_path: Path) -> None:
    """`expert-parallel scaling` across the namespaces: the CommReport's inter-node bytes agree with
    the bytes the nodes' links sent (kernel counters), and deduplication cuts them."""
    out_file = tmp_path / "scaling.jsonl"
    args = ["-m", "expert_parallel", "scaling", "--d-model", "128", "--d-ff", "64", "--experts", "16",
            "--top-k", "4", "--tokens", "128", "--steps", "3", "--warmup", "1", "--out", str(out_file)]
    run(cluster(RUN + "4", *args, port=29614), timeout=400)
    records = {r["variant"]: r for r in map(json.loads, out_file.read_text().splitlines())}
    for r in records.values():
        assert r["nodes"] == 2 and r["ranks"] == 4
        assert r["link_bytes_per_step"] == pytest.approx(r["inter_bytes_per_step"], rel=0.25), r
    flat, hier, limited = (records[v]["inter_bytes_per_step"]
                           for v in ("flat", "hierarchical", "node_limited"))
    assert limited < hier < flat


def test_node_killed_mid_run_then_resumed_from_the_shared_checkpoints(tmp_path: Path) -> None:
    """The LM example on 2 nodes x 2 ranks with the hierarchical exchange: every process of node 1
    SIGKILLed mid-run (node 0 fails on the broken link and the launcher exits and cleans up), then
    the job is started again with --resume on the same checkpoint directory: its losses equal an
    uninterrupted run's, bit for bit."""
    from tests.test_checkpoint import LM_ARGS, TRAIN, records

    # A killed node's connections may never close on node 0 (its namespace and links go at once):
    # node 0 then fails at the collective timeout, 60 s here instead of the default 300.
    common = [str(TRAIN), "--steps", "20", "--save-every", "4", "--ep-size", "4",
              "--exchange", "hierarchical", "--timeout", "60", *LM_ARGS]
    straight = tmp_path / "straight"
    run(cluster(RUN + "5", *common, "--out", str(straight), port=29615), timeout=400)
    broken = tmp_path / "broken"
    proc = subprocess.Popen(cluster(RUN + "6", *common, "--out", str(broken), port=29616), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed_at = None
    try:
        deadline = time.time() + 300  # bounds for a loaded 2-core machine (alone: ~47 s in all)
        while proc.poll() is None and time.time() < deadline and killed_at is None:
            metrics = broken / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
                node1 = subprocess.run(["ip", "netns", "pids", RUN + "6n1"], capture_output=True, text=True)
                for pid in node1.stdout.split():
                    os.kill(int(pid), signal.SIGKILL)
                killed_at = len(metrics.read_text().splitlines())
            time.sleep(0.05)
        assert proc.wait(timeout=240) != 0
    finally:
        stop(proc)
    assert killed_at is not None and killed_at < 20 and namespaces(RUN + "6") == []
    out = run(cluster(RUN + "7", *common, "--resume", "--out", str(broken), port=29617), timeout=400)
    assert "resumed from" in out, out[-3000:]
    resumed = records(broken)
    assert [r["step"] for r in resumed] == list(range(1, 21))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records(straight)]
