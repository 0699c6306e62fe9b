"""Run under a launcher (2 ranks): planted failures must end as clear errors, never hangs.

    torchrun --standalone --nproc-per-node 2 tests/workers/failures.py SCENARIO

Scenarios that every rank survives (each prints "OK <scenario>: <error>"):
  config_mismatch    rank 1 builds the layer with another top_k -> ValueError at construction
  split_mismatch     rank 1 sends one row to the wrong peer, debug split check on -> CollectiveError
  call_order         ranks call two layers in different orders, debug check on -> CollectiveError
  nan_input          NaN in rank 1's input, finite check on -> FloatingPointError on both ranks
Scenarios where a rank fails (the survivors print "FAILED <seconds>: <error>" and exit 3):
  kill               rank 1 SIGKILLs itself inside the dispatch all-to-all of step 3
  hang               rank 1 sleeps (alive) inside the dispatch all-to-all of step 3
  stall              as hang, with the stall reporter that NCCL jobs run (started here on gloo):
                     rank 0 is ended at 0.9 × the timeout by the reporter, which names the layer
  nccl_exit          (GPUs, NCCL, timeout 20 s) rank 1 exits inside the dispatch of step 3: rank 0
                     blocks at its next host read and the reporter ends it naming the layer
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

import expert_parallel as ep
import expert_parallel.comm.exchange as exchange
from expert_parallel.comm.watchdog import start_stall_reporter

TIMEOUT = 6.0  # seconds: the process-group timeout of this test
NCCL_TIMEOUT = 20.0  # seconds: the nccl_exit scenario's (NCCL's own start-up takes seconds)
D = 8


def moe(ctx: ep.DistContext, **overrides: object) -> ep.MoE:
    torch.manual_seed(0)
    base = dict(d_model=D, d_ff=8, num_experts=4, top_k=2, capacity_factor=1.0)
    cfg = ep.MoEConfig(**{**base, **overrides})
    return ep.MoE(cfg, ep_group=ctx.ep_group)


def expect(kind: type[BaseException], scenario: str, fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
    except kind as err:
        print(f"OK {scenario}: {type(err).__name__}: {err}", flush=True)
        return
    raise AssertionError(f"{scenario}: no {kind.__name__} raised")


def plant_in_dispatch(rank: int, action) -> None:  # type: ignore[no-untyped-def]
    """On ``rank``, run ``action`` inside the dispatch all-to-all (the others are already in it)."""
    original = exchange.all_to_all

    def planted(x, out_splits, in_splits, group, info=None, phase="all-to-all", health=None):  # type: ignore[no-untyped-def]
        if phase == "dispatch" and torch.distributed.get_rank() == rank and info.call == 3:
            action(out_splits, in_splits)
        return original(x, out_splits, in_splits, group, info, phase, health)

    exchange.all_to_all = planted


def main() -> int:
    scenario = sys.argv[1]
    nccl = scenario == "nccl_exit"
    ctx = ep.init_distributed(backend="nccl" if nccl else "gloo", timeout=NCCL_TIMEOUT if nccl else TIMEOUT)
    if scenario == "stall":
        start_stall_reporter(TIMEOUT, ctx.rank)
    r = ctx.rank
    x = torch.randn(2, 8, D)
    if scenario == "config_mismatch":
        expect(ValueError, scenario, lambda: moe(ctx, top_k=1 if r == 1 else 2))
    elif scenario == "split_mismatch":
        layer = moe(ctx, capacity_factor=None)
        ep.configure_debug(layer, check_splits=True)
        original = exchange.all_to_all

        def one_row_to_the_wrong_peer(x, out_splits, in_splits, group, info=None, phase="", health=None):  # type: ignore[no-untyped-def]
            if r == 1 and phase == "dispatch" and in_splits[0] > 0:
                in_splits = [in_splits[0] - 1, in_splits[1] + 1]
            return original(x, out_splits, in_splits, group, info, phase, health)

        exchange.all_to_all = one_row_to_the_wrong_peer
        expect(exchange.CollectiveError, scenario, lambda: layer(x))
    elif scenario == "call_order":
        first, second = moe(ctx), moe(ctx)
        ep.configure_debug(torch.nn.ModuleList([first, second]), check_splits=True)
        order = (first, second) if r == 0 else (second, first)
        expect(exchange.CollectiveError, scenario, lambda: [layer(x) for layer in order])
    elif scenario == "nan_input":
        layer = moe(ctx)
        ep.configure_debug(layer, check_finite=True)
        if r == 1:
            x[0, 3, 0] = float("nan")
        expect(FloatingPointError, scenario, lambda: layer(x))
    else:
        return fail_a_rank(ctx, scenario)
    ep.shutdown(ctx)  # ends a launched process at once (docs/reliability.md, "Ending a job")
    return 0


def fail_a_rank(ctx: ep.DistContext, scenario: str) -> int:
    """Rank 1 dies or hangs inside step 3's dispatch; the others must fail within the timeout."""
    if scenario == "kill":
        plant_in_dispatch(1, lambda *_: os.kill(os.getpid(), signal.SIGKILL))
    elif scenario == "nccl_exit":
        plant_in_dispatch(1, lambda *_: os._exit(0))
    else:
        plant_in_dispatch(1, lambda *_: time.sleep(3600))
    layer = moe(ctx).to(ctx.device)
    start = None
    try:
        for step in range(1, 6):
            if step == 3:
                start = time.monotonic()
                print(f"STEP 3 at {time.time():.3f} on rank {ctx.rank}", flush=True)
            y, aux = layer(torch.randn(2, 8, D, device=ctx.device))
            (y.sum() + aux.loss).backward()
    except exchange.CollectiveError as err:
        elapsed = time.monotonic() - (start or time.monotonic())
        print(f"FAILED {elapsed:.2f}s on rank {ctx.rank}: {err}", flush=True)
        os._exit(3)  # a broken process group cannot be shut down cleanly
    raise AssertionError(f"{scenario}: rank {ctx.rank} finished although rank 1 failed")


if __name__ == "__main__":
    sys.exit(main())
