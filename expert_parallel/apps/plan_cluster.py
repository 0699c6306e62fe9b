"""``expert-parallel plan-cluster``: a cost model of the MoE all-to-all on a cluster.

For one MoE layer's forward + backward on each GPU it predicts the bytes per link class (self, inside
the node, between nodes) of the flat exchange, the hierarchical exchange and the hierarchical exchange
with node-limited routing, and the step time those bytes cost next to the expert GEMMs:

    expert-parallel plan-cluster --nodes 8 --gpus-per-node 8 --intra-gbps 900 --inter-gbps 50 \\
        --d-model 7168 --d-ff 2048 --experts 256 --top-k 8 --tokens-per-gpu 8192

The model (uniform routing; every expert choice equally likely, K distinct experts per token):
- flat: of a token's K copies, a share 1/(N·P) stays on the GPU, (P-1)/(N·P) goes to the node's other
  GPUs and (N-1)/N crosses to other nodes; node-limited routing does not change these shares.
- hierarchical: a token crosses once to each remote node that holds one of its experts: (N-1)·h nodes,
  h = 1 - C(E - E/N, K) / C(E, K) the chance that a node holds at least one of K experts; with routing
  limited to M nodes, M·(N-1)/N·h_M (h for the M·E/N experts of the chosen nodes). Each copy adds
  12 bytes of metadata (indices and the gate) and 4 bytes of gate gradient; inside the node a proxy
  forwards all T·K copies that reach its rail, (P-1)/P of them to the other GPUs.
- bytes: rows of D elements go out in dispatch and back in combine, forward and backward (4 passes);
- time: a node's link carries its P GPUs' inter-node bytes (``--inter-per node``) or each GPU has its
  own NIC (``--inter-per gpu``, the default); flat overlaps the two link classes (one all-to-all),
  hierarchical runs its stages one after the other; GEMMs: 3·2·T·K·D·F·(3 gated, 2 not) FLOPs at
  ``--tflops``, or a measured ``--compute-s``; ``--overhead`` scales payload to wire bytes (TCP/IP).

Bandwidths are in GB/s (10^9 bytes per second) per direction.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

VARIANTS = ("flat", "hierarchical", "node_limited")


@dataclass(frozen=True)
class Cluster:
    """N nodes of P GPUs; bandwidths in GB/s per direction; a fixed cost per inter-node round."""

    nodes: int
    gpus_per_node: int
    intra_gbps: float
    inter_gbps: float
    inter_per: str = "gpu"
    overhead: float = 1.0
    round_latency_s: float = 20e-6


@dataclass(frozen=True)
class Workload:
    """One MoE layer on each GPU: T tokens, D, F, E experts, top-K, bytes per element."""

    d_model: int
    d_ff: int
    experts: int
    top_k: int
    tokens_per_gpu: int
    element_bytes: int = 2
    gated: bool = True
    limited_nodes: int = 1


def node_hit(experts: int, nodes: int, k: int) -> float:
    """The chance that a given node holds at least one of a token's K distinct experts."""
    per_node = experts // nodes
    return 1.0 - math.comb(experts - per_node, k) / math.comb(experts, k)


def traffic(c: Cluster, w: Workload, variant: str) -> dict[str, float]:
    """Bytes one GPU sends per layer forward + backward, per link class ("self", "intra", "inter")."""
    N, P, T, K = c.nodes, c.gpus_per_node, w.tokens_per_gpu, w.top_k
    row = w.d_model * w.element_bytes * 4  # dispatch and combine, forward and backward
    copies = T * K
    if variant == "flat":
        return {"self": copies / (N * P) * row, "intra": copies * (P - 1) / (N * P) * row,
                "inter": copies * (N - 1) / N * row}
    if variant == "hierarchical":
        remote, own = (N - 1) * node_hit(w.experts, N, K), node_hit(w.experts, N, K)
    else:  # M nodes, each chosen with the chance M / N, each holding one of the K with the chance h_M
        M = w.limited_nodes
        hit = node_hit(M * (w.experts // N), M, K)
        remote, own = M * (N - 1) / N * hit, M / N * hit
    meta = copies * (N - 1) / N * 16  # 12 bytes forward, the gate's gradient back
    return {"self": (T * own + copies / P) * row, "intra": copies * (P - 1) / P * row,
            "inter": T * remote * row + meta}


# Collectives per forward + backward whose messages cross nodes: the count all-gather, then flat: the
# dispatch and combine all-to-alls and their backwards; hierarchical: rows, copy metadata and gates
# to the proxies, the partial sums back, and the backwards of rows, gates and partial sums.
INTER_ROUNDS = {"flat": 5, "hierarchical": 8, "node_limited": 8}


def step_time(c: Cluster, w: Workload, variant: str, compute_s: float) -> dict[str, float]:
    """Seconds of inter-node and intra-node transfer, and the step (transfers + GEMMs); each
    inter-node round also costs ``c.round_latency_s``."""
    t = traffic(c, w, variant)
    node_link = c.inter_gbps * (c.gpus_per_node if c.inter_per == "gpu" else 1) * 1e9
    inter_s = (t["inter"] * c.gpus_per_node * c.overhead / node_link
               + INTER_ROUNDS[variant] * c.round_latency_s) if c.nodes > 1 else 0.0
    intra_s = t["intra"] * c.overhead / (c.intra_gbps * 1e9)
    comm_s = max(inter_s, intra_s) if variant == "flat" else inter_s + intra_s
    return {"inter_s": inter_s, "intra_s": intra_s, "comm_s": comm_s, "step_s": comm_s + compute_s}


def gemm_seconds(w: Workload, tflops: float) -> float:
    """Forward + backward expert GEMMs of one GPU at ``tflops`` achieved."""
    flops = 3 * 2 * w.tokens_per_gpu * w.top_k * w.d_model * w.d_ff * (3 if w.gated else 2)
    return flops / (tflops * 1e12)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--intra-gbps", type=float, default=900.0, help="GB/s per GPU inside a node")
    parser.add_argument("--inter-gbps", type=float, default=50.0, help="GB/s between nodes (see --inter-per)")
    parser.add_argument("--inter-per", choices=("gpu", "node"), default="gpu",
                        help="--inter-gbps per GPU (a NIC each) or per node (one shared link)")
    parser.add_argument("--d-model", type=int, default=7168)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--element-bytes", type=int, default=2, help="2 for bf16 rows, 4 for fp32")
    parser.add_argument("--limited-nodes", type=int, default=4, help="M of node-limited routing")
    parser.add_argument("--tflops", type=float, default=400.0, help="achieved expert-GEMM TFLOP/s per GPU")
    parser.add_argument("--compute-s", type=float, default=None,
                        help="measured GEMM seconds (overrides --tflops)")
    parser.add_argument("--overhead", type=float, default=1.0, help="wire bytes per payload byte")
    parser.add_argument("--round-latency-us", type=float, default=20.0,
                        help="fixed cost of each collective round that crosses nodes")
    parser.add_argument("--calibrate", type=Path, default=None,
                        help="records of `expert-parallel scaling` (unlimited and rate-limited runs): "
                             "print predicted vs measured")
    parser.add_argument("--rate-mbit", type=float, default=200.0, help="--calibrate: the limited link's rate")
    parser.add_argument("--plot", type=Path, default=None, help="--calibrate: also draw this PNG")


def parse_validated(args: argparse.Namespace) -> tuple[Cluster, Workload]:
    """The cluster and workload of the flags; ValueError names a bad flag."""
    for name in ("nodes", "gpus_per_node", "experts", "top_k", "tokens_per_gpu", "d_model", "d_ff",
                 "limited_nodes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.experts % (args.nodes * args.gpus_per_node):
        raise ValueError(f"--experts {args.experts} is not a multiple of --nodes x --gpus-per-node "
                         f"({args.nodes * args.gpus_per_node}): every GPU holds E / (N·P) experts")
    if args.top_k > args.experts or args.limited_nodes > args.nodes:
        raise ValueError("expected --top-k <= --experts and --limited-nodes <= --nodes")
    for name in ("intra_gbps", "inter_gbps", "tflops", "overhead"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    cluster = Cluster(args.nodes, args.gpus_per_node, args.intra_gbps, args.inter_gbps, args.inter_per,
                      args.overhead, args.round_latency_us * 1e-6)
    work = Workload(args.d_model, args.d_ff, args.experts, args.top_k, args.tokens_per_gpu,
                    args.element_bytes, True, args.limited_nodes)
    return cluster, work


def plan(args: argparse.Namespace) -> str:
    """The table of the three variants (or the calibration against measured records)."""
    if args.calibrate is not None:
        return calibrate(args.calibrate, args.rate_mbit, args.plot)
    cluster, work = parse_validated(args)
    compute = args.compute_s if args.compute_s is not None else gemm_seconds(work, args.tflops)
    lines = [f"{cluster.nodes} nodes x {cluster.gpus_per_node} GPUs, {cluster.intra_gbps:g} GB/s inside, "
             f"{cluster.inter_gbps:g} GB/s between (per {cluster.inter_per}); D {work.d_model}, "
             f"F {work.d_ff}, E {work.experts}, top-{work.top_k}, {work.tokens_per_gpu} tokens/GPU; "
             f"GEMMs {compute * 1e3:.2f} ms",
             f"{'variant':<22}{'inter MB':>10}{'intra MB':>10}{'comm ms':>10}{'step ms':>10}{'comm %':>8}"]
    for variant in VARIANTS:
        t, s = traffic(cluster, work, variant), step_time(cluster, work, variant, compute)
        name = f"{variant} (M={work.limited_nodes})" if variant == "node_limited" else variant
        lines.append(f"{name:<22}{t['inter'] / 1e6:>10.1f}{t['intra'] / 1e6:>10.1f}{s['comm_s'] * 1e3:>10.2f}"
                     f"{s['step_s'] * 1e3:>10.2f}{100 * s['comm_s'] / s['step_s']:>8.1f}")
    return "\n".join(lines)


def calibrate(path: Path, rate_mbit: float, plot: Path | None = None) -> str:
    """Predicted vs measured on the testbed. Bytes: the model's against the CommReport's. Step time
    at ``rate_mbit``: the measured unlimited step + the model's inter-node seconds over one link per
    node (wire overhead from the link counters), first with bytes alone, then with one per-round
    latency fitted (least squares) over the variants."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fast = repeats_median([r for r in records if r["label"] == "unlimited"])
    slow = repeats_median([r for r in records if r["label"] != "unlimited" and r["variant"] in fast])
    base = {v: testbed_prediction(r, fast[v]["median_step_s"], rate_mbit) for v, r in slow.items()}
    latency_s = sum((r["median_step_s"] - base[v][1]) * INTER_ROUNDS[v] for v, r in slow.items()) / max(
        sum(INTER_ROUNDS[v] ** 2 for v in slow), 1)
    rows: list[tuple[str, float, float, float, float]] = []
    lines = [f"fitted latency per inter-node round: {latency_s * 1e3:.1f} ms",
             f"{'variant':<14}{'inter MB pred':>14}{'meas':>8}{'err %':>7}{'step s bytes only':>19}"
             f"{'err %':>7}{'+latency':>10}{'meas':>8}{'err %':>7}"]
    for variant, r in slow.items():
        pred_bytes, bytes_only = base[variant]
        pred_step = bytes_only + INTER_ROUNDS[variant] * latency_s
        meas_b, meas_s = r["inter_bytes_per_step"], r["median_step_s"]
        rows.append((variant, pred_bytes, meas_b, pred_step, meas_s))
        lines.append(f"{variant:<14}{pred_bytes / 1e6:>14.2f}{meas_b / 1e6:>8.2f}"
                     f"{100 * (pred_bytes / meas_b - 1):>7.1f}{bytes_only:>19.3f}"
                     f"{100 * (bytes_only / meas_s - 1):>7.1f}{pred_step:>10.3f}{meas_s:>8.3f}"
                     f"{100 * (pred_step / meas_s - 1):>7.1f}")
    if plot is not None:
        draw_calibration(plot, rows, fast, rate_mbit)
    return "\n".join(lines)


def testbed_prediction(r: dict, unlimited_s: float, rate_mbit: float) -> tuple[float, float]:
    """(inter-node bytes per step over the job, step seconds from bytes alone) for one record."""
    link = r.get("link_bytes_per_step")  # what the links sent, summed over the nodes
    overhead = link / r["inter_bytes_per_step"] if link else 1.0
    cluster = Cluster(r["nodes"], r["ranks"] // r["nodes"], 1.0, rate_mbit / 8e3, "node", overhead, 0.0)
    work = Workload(r["d_model"], r["d_ff"], r["experts"], r["top_k"], r["tokens_per_rank"], 4, True,
                    r["limited_nodes"] or 1)
    pred_bytes = traffic(cluster, work, r["variant"])["inter"] * r["ranks"]
    return pred_bytes, unlimited_s + step_time(cluster, work, r["variant"], 0.0)["inter_s"]


def repeats_median(records: list[dict]) -> dict[str, dict]:
    """One record per variant: the first, with the median step time over the repeated runs."""
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        runs = [r for r in records if r["variant"] == variant]
        out[variant] = {**runs[0], "median_step_s": statistics.median(r["median_step_s"] for r in runs),
                        "repeats": len(runs)}
    return out


def draw_calibration(path: Path, rows: list[tuple[str, float, float, float, float]],
                     fast: dict[str, dict], rate_mbit: float) -> Path:
    """Inter-node MB per step and step time of each variant: measured bars, predicted markers."""
    from .plots import plt, save_figure
    names = [r[0] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(rows))
    left.bar(xs, [r[2] / 1e6 for r in rows], color="tab:blue", label="measured (CommReport)")
    left.plot(xs, [r[1] / 1e6 for r in rows], "k_", ms=30, mew=2, label="cost model")
    left.set(xticks=list(xs), xticklabels=names, ylabel="MB per step", title="Bytes crossing nodes")
    width = 0.4
    right.bar([x - width / 2 for x in xs], [fast[n]["median_step_s"] if n in fast else 0 for n in names],
              width, color="tab:green", label="unlimited links")
    right.bar([x + width / 2 for x in xs], [r[4] for r in rows], width, color="tab:orange",
              label=f"{rate_mbit:g} Mbit/s links")
    right.plot([x + width / 2 for x in xs], [r[3] for r in rows], "k_", ms=20, mew=2, label="cost model")
    right.set(xticks=list(xs), xticklabels=names, ylabel="seconds", title="Forward + backward (median)")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)
