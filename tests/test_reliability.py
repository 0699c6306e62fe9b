"""Failures become clear errors, never hangs: planted mistakes, killed and hung ranks, bad numbers."""

from __future__ import annotations

import re
import sys
import time

import psutil
import pytest
import torch

import expert_parallel as ep
from tests.helpers import check_low_precision
from tests.procs import WORKERS, run, torchrun
from tests.test_launchers import free_port, require

TIMEOUT = 6.0  # the process-group timeout in tests/workers/failures.py
WORKER = str(WORKERS / "failures.py")


@pytest.mark.parametrize("scenario, message", [
    ("config_mismatch", r"MoEConfig differs between the ranks of the expert-parallel group in \['top_k'\]"),
    ("split_mismatch", r"MoE call 1, dispatch: split sizes disagree"),
    ("call_order", r"ranks are in different MoE calls"),
    ("nan_input", r"MoE call 1: NaN or Inf in the input"),
])
def test_planted_mistakes_are_clear_errors_on_every_rank(scenario: str, message: str) -> None:
    out = torchrun(2, "failures.py", scenario, timeout=120)
    # both ranks report the error (their lines may interleave)
    assert len(re.findall(rf"OK {scenario}: \w+: [^\n]*?{message}", out)) == 2, out[-3000:]


def launch(launcher: str, scenario: str) -> list[str]:
    if launcher == "torchrun":
        # torchrun's agent stops the surviving workers as soon as it notices a dead one (it looks
        # every --monitor-interval, 0.1 s by default), which can cut rank 0's report short while it
        # is still in its error path; 5 s lets the report through (docs/reliability.md).
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--monitor-interval", "5", WORKER, scenario]
    if launcher == "mpi":
        return [require("mpiexec"), "-n", "2", sys.executable, WORKER, scenario]
    return [require("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), WORKER, scenario]


def leftovers() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if WORKER in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("launcher", ["torchrun", "mpi", "deepspeed"])
@pytest.mark.parametrize("scenario", ["kill", "hang"])
def test_a_failed_rank_makes_the_others_exit_with_a_named_error(launcher: str, scenario: str) -> None:
    """Rank 1 dies (SIGKILL) or hangs alive inside step 3's all-to-all: rank 0 exits with an error
    naming the layer, call, phase and sizes within the timeout (+5 s to name a hung rank), the job
    ends with a failure, and no process is left behind."""
    start = time.monotonic()
    out = run(launch(launcher, scenario), timeout=180, env={"DS_ACCELERATOR": "cpu"}, expect_failure=True)
    wall = time.monotonic() - start
    if launcher == "mpi" and scenario == "kill":
        # MPICH's mpiexec ends the job itself as soon as a rank dies: the survivors are killed at once
        assert "BAD TERMINATION" in out and wall < TIMEOUT + 10, (wall, out[-3000:])
        time.sleep(1)
        assert leftovers() == [], "processes left running"
        return
    # Rank 0 is normally in the dispatch all-to-all. It can still be reading the last bytes of call
    # 3's count exchange when rank 1 dies: a reset connection drops them, and that phase is named.
    failed = re.search(r"FAILED ([\d.]+)s on rank 0: MoE call 3, (dispatch \(sending rows \[\d+, \d+\], "
                       r"receiving \[\d+, \d+\]\)|count exchange \([^)]*\)) on rank 0 failed", out)
    assert failed, out[-4000:]
    detect = float(failed.group(1))
    # within the timeout, plus at most the 5 s monitored barrier that names unresponsive ranks
    assert detect < TIMEOUT + 5 + 3, detect
    if scenario == "kill" and launcher == "torchrun":
        # a dead peer's closed connection is noticed without waiting for the timeout (measured:
        # well under a second; the bound leaves room for a loaded runner)
        assert detect < TIMEOUT - 1, detect
    if scenario == "hang":
        assert detect > TIMEOUT - 0.5, detect
        assert "Ranks 1 failed to pass monitoredBarrier" in out, out[-3000:]
    print(f"{launcher} {scenario}: rank 0 failed {detect:.2f}s after the fault; job ended after {wall:.1f}s")
    time.sleep(1)
    assert leftovers() == [], "processes left running"


def test_the_stall_reporter_ends_a_blocked_rank_naming_the_layer() -> None:
    """What NCCL jobs run (started on gloo here, where the collective would otherwise raise at the
    timeout): rank 1 hangs alive in step 3's dispatch; the reporter ends rank 0 at 0.9 × the 6 s
    timeout, before the collective's own timeout, with status 1 and a line naming the layer, call,
    phase and sizes; the job ends and leaves no process."""
    start = time.monotonic()
    out = run(launch("torchrun", "stall"), timeout=120, expect_failure=True)
    wall = time.monotonic() - start
    named = re.search(r"expert_parallel: rank 0: MoE call 3, dispatch \(sending rows \[\d+, \d+\], "
                      r"receiving \[\d+, \d+\]\) has not finished after ([\d.]+) s \(the collective "
                      r"timeout is 6 s\)", out)
    assert named, out[-3000:]
    assert 0.9 * TIMEOUT <= float(named.group(1)) < TIMEOUT, out[-3000:]
    assert not re.search(r"FAILED [\d.]+s on rank", out), out[-3000:]  # the collective never raised
    assert "exitcode  : 1" in out and wall < 60, (wall, out[-3000:])
    time.sleep(1)
    assert leftovers() == [], "processes left running"


def test_stall_marks_are_per_thread_nested_marks_keep_the_outer_and_all_are_cleared() -> None:
    """Two threads in marked regions at once, leaving in the other order, and a nested region:
    the reporter sees each thread's outermost mark and nothing once all have left (a single slot
    restored on exit would leave the first thread's mark behind and end a healthy rank later)."""
    import threading

    from expert_parallel.comm import watchdog

    entered, leave_first, left_first = threading.Event(), threading.Event(), threading.Event()

    def other() -> None:
        with watchdog.in_flight("other thread"):
            entered.set()
            leave_first.wait(10)
        left_first.set()

    with watchdog.in_flight("main thread"):
        with watchdog.in_flight("nested"):
            thread = threading.Thread(target=other)
            thread.start()
            assert entered.wait(10)
            assert sorted(what for what, _ in watchdog._WAITING.values()) == ["main thread", "other thread"]
        assert sorted(what for what, _ in watchdog._WAITING.values()) == ["main thread", "other thread"]
        leave_first.set()
        assert left_first.wait(10)
        assert [what for what, _ in watchdog._WAITING.values()] == ["main thread"]
    thread.join(10)
    assert watchdog._WAITING == {}


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_on_nccl_a_peer_that_exits_ends_the_job_naming_the_layer() -> None:
    """Two GPUs, NCCL, a 20 s timeout: rank 1 exits inside step 3's dispatch; rank 0 blocks at its
    next host read and is ended within the timeout with a line naming the layer and call."""
    start = time.monotonic()
    out = run(launch("torchrun", "nccl_exit"), timeout=180, expect_failure=True)
    wall = time.monotonic() - start
    assert re.search(r"expert_parallel: rank 0: MoE call [34], .* has not finished after [\d.]+ s", out), \
        out[-3000:]
    assert wall < 120, wall


def test_nan_without_the_check_is_contained_and_with_it_names_the_layer() -> None:
    """Documented behaviour: a NaN token gets a NaN output, other tokens of the group stay finite
    (top-k, dropless); with configure_debug(check_finite=True) the layer raises with its name."""
    cfg = ep.MoEConfig(d_model=8, d_ff=8, num_experts=4, capacity_factor=None)
    model = torch.nn.ModuleDict({"block": ep.MoE(cfg)})
    x = torch.randn(2, 5, 8)
    x[1, 2, 3] = float("nan")
    y, _ = model["block"](x)
    assert torch.isnan(y[1, 2]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[1, :2]).all()
    assert ep.configure_debug(model, check_finite=True) == ["block"]
    with pytest.raises(FloatingPointError, match="block call 2: NaN or Inf in the input"):
        model["block"](x)
    x[1, 2, 3] = 0.0
    with torch.no_grad():
        model["block"].router.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or Inf in the router logits"):
        model["block"](x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_route_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ref = ep.MoE(ep.MoEConfig(d_model=16, d_ff=32, num_experts=4, capacity_factor=None))
    low = ep.MoE(ep.MoEConfig(d_model=16, d_ff=32, num_experts=4, capacity_factor=None, dtype=dtype))
    low.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})  # the same values
    x = torch.randn(4, 8, 16)
    y, aux, _, _ = check_low_precision(low, ref, x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    assert aux.z_loss.dtype == torch.float32 and aux.load_balance_loss.dtype == torch.float32
    y.float().square().sum().backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in low.parameters() if p.grad is not None)


def test_huge_logits_do_not_produce_nan() -> None:
    moe = ep.MoE(ep.MoEConfig(d_model=8, d_ff=8, num_experts=4, capacity_factor=1.0, dtype="bfloat16"))
    with torch.no_grad():
        moe.router.weight.mul_(1e6)  # logits around 1e6
    x = torch.randn(2, 8, 8, dtype=torch.bfloat16)
    y, aux = moe(x)
    assert torch.isfinite(y.float()).all() and torch.isfinite(aux.loss) and aux.z_loss > 1e9
    (y.float().sum() + aux.loss).backward()
    assert torch.isfinite(moe.router.weight.grad.float()).all()


def test_z_loss_keeps_router_logits_bounded() -> None:
    """Same short training from large logits with and without z-loss: with it, mean logsumexp² (what
    the z-loss bounds) falls below where it started and well below the run without it."""
    final, start = {}, {}
    for coef in (0.0, 0.1):
        torch.manual_seed(0)
        moe = ep.MoE(ep.MoEConfig(d_model=16, d_ff=16, num_experts=4, capacity_factor=None,
                                  z_loss_coef=coef, load_balance_coef=0.0))
        with torch.no_grad():
            moe.router.weight.mul_(50)  # start with large logits
        opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        probe = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
        start[coef] = torch.logsumexp(moe.router.logits(probe), -1).square().mean().item()
        for _ in range(30):
            x = torch.randn(4, 8, 16, generator=g)
            y, aux = moe(x)
            ((y - x).square().mean() + aux.loss).backward()
            opt.step()
            opt.zero_grad()
        final[coef] = torch.logsumexp(moe.router.logits(probe), -1).square().mean().item()
    assert final[0.1] < start[0.1] and final[0.1] < 0.85 * final[0.0], (start, final)
