"""``expert-parallel scaling``: the exchange variants side by side on a multi-node job.

Run under the one-machine cluster (launch/netns_cluster.sh) or any multi-node torchrun:

    launch/netns_cluster.sh --nodes 2 --nproc-per-node 2 --rate 200mbit -- \\
        -m expert_parallel scaling --out out/scaling_200mbit.jsonl

For each variant — ``flat``, ``hierarchical``, and ``node_limited`` (hierarchical with group-limited
routing, one expert group per node, each token on at most ``--limited-nodes`` nodes) — it times
forward + backward of one MoE layer (median over the steps of the slowest rank), and counts the bytes
that cross a node boundary two ways: the CommReport (payload, forward and backward) and, where the
node has an ``eth0`` (the cluster's link), the kernel's counter of bytes the link sent. One JSON line
per variant goes to ``--out`` (rank 0), and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..comm.distributed import DistContext, group_ranks_per_node, init_distributed
from ..config import MoEConfig
from ..layer import MoE
from ..ops.dispatch import CommReport

LINK = Path("/sys/class/net/eth0/statistics/tx_bytes")
VARIANTS = ("flat", "hierarchical", "node_limited")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags (defaults: the DeepSeek-like fine-grained shape of the scaling study)."""
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=256)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--limited-nodes", type=int, default=1, help="M of the node_limited variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--label", default="", help="a tag for the records, e.g. the link rate")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines, one per variant (rank 0)")
    parser.add_argument("--seed", type=int, default=0)


def variant_config(args: argparse.Namespace, variant: str, nodes: int) -> MoEConfig:
    """The layer of one variant: dropless top-k, SwiGLU experts; node_limited adds group-limited
    routing with one expert group per node."""
    limited = (dict(num_expert_groups=nodes, num_limited_groups=args.limited_nodes)
               if variant == "node_limited" else {})
    return MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k,
                     capacity_factor=None, activation="swiglu",
                     exchange="flat" if variant == "flat" else "hierarchical", **limited)


def link_bytes(ctx: DistContext) -> int:
    """Bytes this node's link has sent (counted on local rank 0 only; 0 without a cluster link)."""
    return int(LINK.read_text()) if ctx.local_rank == 0 and LINK.exists() else 0


GATE_SHARE = 4 / 12  # the fp32 gate's share of a copy's 12 metadata bytes


def step_payload(comm: CommReport) -> dict[str, int]:
    """Bytes a forward + backward sends per link class: rows go both ways twice (data, then
    gradients); a copy's metadata (8 bytes of indices and the gate) goes forward only, the gate's
    gradient comes back."""
    out = {k: 2 * v for k, v in comm.bytes_by_class.items()}
    for peer, meta in enumerate(comm.meta_bytes):
        out[comm.link_class(peer)] -= round(meta * (1 - GATE_SHARE))  # doubled above; only gates return
    return out


def measure(args: argparse.Namespace, ctx: DistContext, variant: str, nodes: int) -> dict[str, Any]:
    """Median forward+backward time (slowest rank) and the bytes of one variant."""
    cfg = variant_config(args, variant, nodes)
    torch.manual_seed(args.seed)
    moe = MoE(cfg, ep_group=ctx.ep_group).to(ctx.device)
    gen = torch.Generator().manual_seed(args.seed + 1 + ctx.rank)
    x = torch.randn(1, args.tokens, args.d_model, generator=gen).to(ctx.device).requires_grad_()
    w = torch.randn(1, args.tokens, args.d_model, generator=gen).to(ctx.device)
    times, payload = [], {}
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sent_before = link_bytes(ctx)
        dist.barrier()
        start = time.perf_counter()
        y, aux = moe(x)
        ((y * w).sum() + aux.loss).backward()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # NOTE: collective
        if step >= args.warmup:
            times.append(float(elapsed))
        assert aux.comm is not None
        payload = step_payload(aux.comm)
    link = link_bytes(ctx) - sent_before
    totals = torch.tensor([payload["self"], payload["intra"], payload["inter"], link], dtype=torch.float64)
    dist.all_reduce(totals)  # NOTE: collective: summed over the job
    self_b, intra_b, inter_b, link_b = totals.tolist()
    return {"variant": variant, "label": args.label, "nodes": nodes, "ranks": ctx.world_size,
            "d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts, "top_k": args.top_k,
            "tokens_per_rank": args.tokens,
            "limited_nodes": args.limited_nodes if variant == "node_limited" else None,
            "median_step_s": statistics.median(times), "step_s": times,
            "self_bytes_per_step": self_b, "intra_bytes_per_step": intra_b, "inter_bytes_per_step": inter_b,
            "link_bytes_per_step": link_b / args.steps if link_b else None}


def scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs every variant; rank 0 prints the table and writes the records."""
    ctx = init_distributed()
    per_node = group_ranks_per_node(ctx.ep_group)
    if per_node is None:
        raise ValueError("the expert-parallel group spans nodes unevenly (ranks per node differ)")
    nodes = ctx.ep_size // per_node
    records = [measure(args, ctx, v, nodes) for v in args.variants]
    if ctx.rank == 0:
        print(table(records), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
    return records


def table(records: list[dict[str, Any]]) -> str:
    """Step time and inter-node bytes of each variant, and their ratios to flat."""
    flat = next((r for r in records if r["variant"] == "flat"), records[0])
    lines = [f"{'variant':<14}{'step s':>9}{'x flat':>8}{'inter MB':>10}{'x flat':>8}{'link MB':>9}"]
    for r in records:
        link = r["link_bytes_per_step"]
        speed = r["median_step_s"] / flat["median_step_s"]
        lines.append(f"{r['variant']:<14}{r['median_step_s']:>9.3f}{speed:>8.2f}"
                     f"{r['inter_bytes_per_step'] / 1e6:>10.2f}"
                     f"{r['inter_bytes_per_step'] / max(flat['inter_bytes_per_step'], 1):>8.2f}"
                     f"{(link or 0) / 1e6:>9.2f}")
    return "\n".join(lines)
