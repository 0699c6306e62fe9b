"""Forward+backward time of our MoE layer against the compute floor and DeepSpeed's MoE, interleaved.

    expert-parallel bench                                        # one process
    torchrun --standalone --nproc-per-node 2 -m expert_parallel.cli bench   # expert-parallel

- **ours**: ``ep.MoE`` on T random tokens per rank (routing, dispatch, exchange, experts, combine).
- **floor**: the same expert MLPs (our GroupedExperts) on already-grouped, balanced rows: each local
  expert runs T·K·R/E rows, with no routing and no exchange.
- **deepspeed**: ``deepspeed.moe.layer.MoE`` on the same shapes (when DeepSpeed is installed), with
  its GShard-style [S, E, C] dispatch and combine.
Each repeat times every variant once, in turn, so machine noise hits them alike; medians over the
repeats after warm-up. Output: a table on rank 0 and, with --json, the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import MoEConfig
from .distributed import DistContext, init_distributed
from .experts import GroupedExperts
from .layer import MoE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (defaults: the configuration of the performance targets)."""
    add = parser.add_argument
    add("--tokens", type=int, default=4096, help="tokens per rank")
    add("--d-model", type=int, default=512)
    add("--d-ff", type=int, default=1024)
    add("--num-experts", type=int, default=8)
    add("--top-k", type=int, default=2)
    add("--capacity-factor", type=lambda t: None if t.lower() == "none" else float(t), default=1.25)
    add("--router", default="topk")
    add("--dtype", default="float32")
    add("--repeats", type=int, default=7)
    add("--warmup", type=int, default=2)
    add("--no-deepspeed", action="store_true")
    add("--json", type=Path, default=None)
    add("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


Step = Callable[[], None]


def _ours(cfg: MoEConfig, ctx: DistContext, x: torch.Tensor) -> Step:
    layer = MoE(cfg, ep_group=ctx.ep_group)

    def step() -> None:
        y, aux = layer(x)
        (y.float().square().mean() + aux.loss).backward()
    return step


def _floor(cfg: MoEConfig, ctx: DistContext, tokens: int) -> Step:
    local = cfg.num_experts // ctx.ep_size
    experts = GroupedExperts(cfg, base_seed=0, num_local=local)
    rows = tokens * cfg.top_k  # balanced: every rank's experts get T·K rows in all
    x = torch.randn(rows, cfg.d_model, dtype=cfg.dtype, requires_grad=True)
    counts = torch.full((local,), rows // local, dtype=torch.int64)
    counts[-1] += rows - int(counts.sum())

    def step() -> None:
        experts(x, counts).float().square().mean().backward()
    return step


def _deepspeed(cfg: MoEConfig, ctx: DistContext, x: torch.Tensor) -> Step | None:
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE as DeepSpeedMoE
    except ImportError:
        return None
    deepspeed.init_distributed(dist_backend=ctx.backend)
    expert = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
    layer = DeepSpeedMoE(cfg.d_model, expert.to(cfg.dtype), num_experts=cfg.num_experts,
                         ep_size=ctx.ep_size, k=cfg.top_k, capacity_factor=cfg.capacity_factor or 1.0,
                         eval_capacity_factor=cfg.capacity_factor or 1.0, min_capacity=cfg.min_capacity,
                         drop_tokens=cfg.capacity_factor is not None, use_rts=False,
                         top2_2nd_expert_sampling=False).to(cfg.dtype)
    layer.set_deepspeed_parallelism()  # NOTE: collective (DeepSpeed's expert groups)

    def step() -> None:
        y, l_aux, _ = layer(x)
        (y.float().square().mean() + l_aux).backward()
    return step


def _time(step: Step) -> float:
    dist.barrier()  # NOTE: collective: every rank starts together
    start = time.perf_counter()
    step()
    dist.barrier()  # NOTE: collective: the slowest rank decides
    return time.perf_counter() - start


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the interleaved measurement; returns medians (seconds) and ratios."""
    ctx = init_distributed()
    cfg = MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.num_experts, top_k=args.top_k,
                    router=args.router, capacity_factor=args.capacity_factor, dtype=args.dtype)
    torch.manual_seed(ctx.rank)
    x = torch.randn(1, args.tokens, cfg.d_model, dtype=cfg.dtype)
    variants: dict[str, Step] = {"ours": _ours(cfg, ctx, x), "floor": _floor(cfg, ctx, args.tokens)}
    ds = None if args.no_deepspeed or args.router != "topk" or args.top_k > 2 else _deepspeed(cfg, ctx, x)
    if ds is not None:
        variants["deepspeed"] = ds
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.warmup + args.repeats):
        for name, step in variants.items():
            elapsed = _time(step)
            if repeat >= args.warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "local_rank")},
              "world_size": ctx.world_size, "ep_size": ctx.ep_size, "median_s": medians,
              "ours_over_floor": medians["ours"] / medians["floor"]}
    if "deepspeed" in medians:
        result["ours_over_deepspeed"] = medians["ours"] / medians["deepspeed"]
        result["deepspeed_over_floor"] = medians["deepspeed"] / medians["floor"]
    if ctx.rank == 0:
        print(format_table(result))
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


def format_table(result: dict[str, Any]) -> str:
    """The human-readable summary of one benchmark run."""
    cfg = result["config"]
    lines = [f"MoE forward+backward, {cfg['tokens']} tokens/rank, D={cfg['d_model']} F={cfg['d_ff']} "
             f"E={cfg['num_experts']} K={cfg['top_k']} capacity={cfg['capacity_factor']} {cfg['dtype']}, "
             f"{result['world_size']} rank(s), ep_size {result['ep_size']}, medians of {cfg['repeats']}",
             f"{'variant':<12}{'median ms':>12}{'x floor':>10}"]
    floor = result["median_s"]["floor"]
    for name, seconds in result["median_s"].items():
        lines.append(f"{name:<12}{seconds * 1e3:>12.1f}{seconds / floor:>10.2f}")
    if "ours_over_deepspeed" in result:
        lines.append(f"ours / deepspeed = {result['ours_over_deepspeed']:.2f}")
    return "\n".join(lines)
