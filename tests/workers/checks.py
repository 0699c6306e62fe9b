"""The driver of the workers that run named checks under torchrun (compose.py, uneven_wrappers.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import expert_parallel as ep


def check_parser(checks: dict[str, Callable[[ep.DistContext], None]]) -> argparse.ArgumentParser:
    """--ep-size and --checks (comma-separated names, all by default)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ep-size", type=int, default=None)
    parser.add_argument("--checks", default=",".join(checks))
    return parser


def run_checks(checks: dict[str, Callable[[ep.DistContext], None]], names: list[str],
               ctx: ep.DistContext) -> int:
    """Runs the named checks in order; rank 0 prints "ok <name>" after each and "ALL OK <n> with
    <world> ranks, ep_size <ep>" at the end; shuts the job down."""
    for name in names:
        checks[name](ctx)
        if ctx.rank == 0:
            print(f"ok {name}", flush=True)
    if ctx.rank == 0:
        print(f"ALL OK {len(names)} with {ctx.world_size} ranks, ep_size {ctx.ep_size}", flush=True)
    ep.shutdown(ctx)
    return 0
