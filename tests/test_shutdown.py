"""ep.shutdown: the end of a job. A launched worker leaves cleanly (atexit handlers run, no teardown
abort) over repeated runs; without a launcher it destroys the groups and returns."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import expert_parallel as ep
from expert_parallel.comm import exchange
from tests.procs import ROOT, WORKERS, run, run_all
from tests.test_launchers import require

pytest.importorskip("transformers")  # the worker is the docs' Hugging Face example

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(WORKERS / "job_end.py"), "shutdown"]


# Jobs of the repeated-runs test: 6 in the suite, more to hunt a rare abort
# (EP_SHUTDOWN_RUNS=20 bash tests/repeat_distributed.sh 1 tests/test_shutdown.py).
SHUTDOWN_RUNS = int(os.environ.get("EP_SHUTDOWN_RUNS", "6"))


def test_launched_workers_end_cleanly_over_repeated_runs(tmp_path: Path) -> None:
    """SHUTDOWN_RUNS torchrun jobs of 2 ranks (two jobs at a time) of a script that, ended with
    destroy_process_group() instead, aborted at exit in 2 of 12 runs: every one exits 0, with no
    "terminate called", each rank's atexit handler runs, and ep.shutdown does not return."""
    for _ in range(max(SHUTDOWN_RUNS // 2, 1)):
        jobs = [[*TORCHRUN, str(tmp_path / f"job{i}")] for i in range(2)]
        for out in run_all(jobs, timeout=180):
            assert "terminate called" not in out, out[-3000:]
            for rank in (0, 1):
                assert f"rank {rank}: trained, saved and loaded" in out, out[-3000:]
                assert f"rank {rank}: atexit handler ran" in out, out[-3000:]
            assert "returned from shutdown" not in out, out[-3000:]


@pytest.mark.parametrize("call", ["ep.shutdown(ctx)", "ep.shutdown()"], ids=["ctx", "no_ctx"])
def test_under_mpiexec_a_rank_that_leaves_first_does_not_end_the_others(tmp_path: Path, call: str) -> None:
    """MPICH's mpiexec ends the whole job when a rank leaves without MPI_Finalize: rank 0 shutting
    down first got rank 1, still finishing, killed (SIGKILL, "BAD TERMINATION" once in a loaded run
    of the docs' demo). ep.shutdown finalizes MPI before it exits: rank 1 finishes its work. Also
    without ctx, as the programs call it: after init_distributed published RANK and WORLD_SIZE the
    environment alone reads as torchrun, and shutdown then skipped the finalize (3 of 43 runs of
    `launch/mpirun.sh 4` lost a rank that way)."""
    require("mpiexec")
    script = tmp_path / "late_rank.py"
    script.write_text(f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
                      "import expert_parallel as ep\n"
                      "from expert_parallel.comm.distributed import launch_env\n"
                      "ctx = ep.init_distributed()\n"
                      "launch = launch_env()\n"
                      "print(f'rank {ctx.rank}: launcher {launch.launcher} "
                      "local size {launch.local_world_size}', flush=True)\n"
                      "if ctx.rank == 1:\n"
                      "    time.sleep(3)\n"
                      "    print('rank 1: finished after rank 0 left', flush=True)\n"
                      f"{call}\n")
    out = run(["bash", "launch/mpirun.sh", "2", str(script)], timeout=120)
    assert "rank 1: finished after rank 0 left" in out, out[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: launcher mpi local size 2" in out, out[-3000:]


def test_without_a_launcher_it_returns_and_atexit_runs_at_exit(tmp_path: Path) -> None:
    out = run([sys.executable, str(WORKERS / "job_end.py"), "shutdown", str(tmp_path)], timeout=120)
    assert "rank 0: returned from shutdown" in out and out.rstrip().endswith("rank 0: atexit handler ran")


def test_in_process_it_destroys_the_groups_and_a_new_job_can_start() -> None:
    ctx = ep.init_distributed()
    cfg = ep.MoEConfig(d_model=8, d_ff=16, num_experts=2)
    ep.MoE(cfg, ep_group=ctx.ep_group)(torch.randn(1, 4, 8))
    exchange.health_group(ctx.ep_group)
    assert exchange._HEALTH_GROUPS
    ep.shutdown(ctx)
    assert not dist.is_initialized() and not exchange._HEALTH_GROUPS and not exchange._SUBGROUPS
    ctx = ep.init_distributed()  # a second job in the same process
    try:
        y_BLD, _ = ep.MoE(cfg, ep_group=ctx.ep_group)(torch.randn(1, 4, 8))
        assert y_BLD.shape == (1, 4, 8)
    finally:
        ep.shutdown(ctx)
    assert not dist.is_initialized()
