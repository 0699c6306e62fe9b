"""Forward+backward time and peak memory of our MoE layer against the compute floor and DeepSpeed's MoE.

    expert-parallel bench                                        # one process
    torchrun --standalone --nproc-per-node 2 -m expert_parallel.cli bench   # expert-parallel
    expert-parallel bench --sweep tokens --plot tokens.png       # scaling curves
    expert-parallel bench --profile                              # where the time goes

- **ours**: ``ep.MoE`` on T random tokens per rank (routing, dispatch, exchange, experts, combine).
- **floor**: the same expert MLPs on already-grouped, balanced rows (T·K per rank, T·K·R/E per
  expert), with no routing and no exchange, in the faster of two forms, both timed: one batched
  ``torch.bmm`` over [e, rows, D] ("floor-bmm") and our per-expert GEMMs ("floor-loop").
- **deepspeed**: ``deepspeed.moe.layer.MoE`` on the same shapes (when DeepSpeed is installed). Its
  0.19.x layer dispatches by index into padded [E, C, D] buffers and runs its experts on all E·C
  slots.
Each repeat times every variant once, in turn (the order rotated each repeat), so machine noise hits
them alike; medians over the repeats after warm-up. Every step starts with no gradients (as after
``zero_grad``) and computes the input gradient too. Output: a table on rank 0 and, with --json, the numbers.

On CPU the bench first tells glibc's malloc to keep freed memory in the process (see
:func:`keep_freed_memory`), as the CUDA caching allocator does; ``--default-malloc`` leaves it alone.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm.distributed import DistContext, init_distributed
from ..config import MoEConfig
from ..layer import MoE
from ..ops.experts import GroupedExperts, ffn
from ..ops.routing import capacity


def _float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (defaults: the configuration of the performance targets)."""
    add = parser.add_argument
    add("--tokens", type=int, default=4096, help="tokens per rank")
    add("--d-model", type=int, default=512)
    add("--d-ff", type=int, default=1024)
    add("--num-experts", type=int, default=8)
    add("--top-k", type=int, default=2)
    add("--capacity-factor", type=_float_or_none, default=1.25, help="a number, or none (dropless)")
    add("--router", default="topk")
    add("--dtype", default="float32")
    add("--repeats", type=int, default=7)
    add("--warmup", type=int, default=2)
    add("--no-deepspeed", action="store_true")
    add("--sweep", choices=["tokens", "experts"], default=None,
        help="tokens: T per rank over --values; experts: E over --values with E·F and K·F held "
             "(F = d_ff·E0/E, K = top_k·E/E0: fine-grained experts at fixed active compute)")
    add("--values", default=None, help="comma-separated sweep values (default 1k..32k tokens, 8..128 E)")
    add("--plot", type=Path, default=None, help="with --sweep: a PNG of time against the swept value")
    add("--profile", action="store_true", help="also break our step's time down by phase")
    add("--overlap-probe", action="store_true",
        help="measure how much of an all-to-all can hide behind expert GEMMs on this machine")
    add("--default-malloc", action="store_true",
        help="CPU: leave glibc's malloc as it is (default: keep freed memory in the process)")
    add("--backend", choices=("gloo", "nccl"), default=None,
        help="nccl runs on the GPUs (also as one process); default: gloo without a launcher")
    add("--peak-tflops", type=float, default=None,
        help="the device's dense peak in --dtype, for the fraction of peak (default: known GPUs, bf16)")
    add("--compile", action="store_true",
        help="also time our layer under torch.compile (ours-compiled), beside the eager one")
    add("--json", type=Path, default=None)
    add("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


Step = Callable[[], None]


@dataclass
class Variant:
    """One benchmarked implementation: a forward+backward step and the tensors it zeroes first."""

    step: Step
    leaves: list[Tensor]

    def __call__(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None  # as after zero_grad(set_to_none=True): gradients are allocated anew
        self.step()


def _ours(cfg: MoEConfig, ctx: DistContext, x: Tensor, compiled: bool = False) -> Variant:
    layer = MoE(cfg, ep_group=ctx.ep_group).to(x.device)
    run = torch.compile(layer) if compiled else layer

    def step() -> None:
        y, aux = run(x)
        (y.float().square().mean() + aux.loss).backward()
    return Variant(step, [x, *layer.parameters()])


def _floor_rows(cfg: MoEConfig, ctx: DistContext, tokens: int, device: torch.device) -> tuple[Tensor, int]:
    local = cfg.num_experts // ctx.ep_size
    rows = tokens * cfg.top_k  # balanced: every rank's experts get T·K rows in all
    per_expert = max(rows // local, 1)
    x = torch.randn(local * per_expert, cfg.d_model, dtype=cfg.dtype, device=device, requires_grad=True)
    return x, local


def _floor_loop(cfg: MoEConfig, ctx: DistContext, tokens: int, device: torch.device) -> Variant:
    x, local = _floor_rows(cfg, ctx, tokens, device)
    experts = GroupedExperts(cfg, base_seed=0, num_local=local).to(device)
    counts = torch.full((local,), x.shape[0] // local, dtype=torch.int64, device=device)

    def step() -> None:
        experts(x, counts).float().square().mean().backward()
    return Variant(step, [x, *experts.parameters()])


def _floor_bmm(cfg: MoEConfig, ctx: DistContext, tokens: int, device: torch.device) -> Variant:
    x, local = _floor_rows(cfg, ctx, tokens, device)
    experts = GroupedExperts(cfg, base_seed=0, num_local=local).to(device)
    x_eND = x.detach().reshape(local, -1, cfg.d_model).requires_grad_(True)

    def step() -> None:
        y = ffn(x_eND, experts.weights(), cfg.activation, mm=torch.bmm,
                add_bias=lambda h, b: h + b.unsqueeze(1))
        y.float().square().mean().backward()
    return Variant(step, [x_eND, *experts.parameters()])


def _deepspeed(cfg: MoEConfig, ctx: DistContext, x: Tensor) -> Variant | None:
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
                         top2_2nd_expert_sampling=False).to(device=x.device, dtype=cfg.dtype)
    layer.set_deepspeed_parallelism()  # NOTE: collective (DeepSpeed's expert groups)

    def step() -> None:
        y, l_aux, _ = layer(x)
        (y.float().square().mean() + l_aux).backward()
    return Variant(step, [x, *layer.parameters()])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Variant, device: torch.device) -> float:
    _sync(device)
    dist.barrier()  # NOTE: collective: every rank starts together
    start = time.perf_counter()
    step()
    _sync(device)
    dist.barrier()  # NOTE: collective: the slowest rank decides
    return time.perf_counter() - start


def _interleaved(variants: dict[str, Variant], warmup: int, repeats: int,
                 device: torch.device) -> dict[str, list[float]]:
    """Times every variant once per repeat, the order rotated by one each repeat.

    The rotation matters on CPU: a step that follows a memory-hungry one (DeepSpeed at 32k tokens
    leaves ~1.4 GiB freed) pays page faults for memory the previous step returned to the system.
    Rotating spreads that over all variants, and the median drops it.
    """
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(warmup + repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = _time(variants[name], device)
            if repeat >= warmup:
                times[name].append(elapsed)
    return times


def peak_bytes(step: Step, device: torch.device) -> int:
    """Peak memory allocated by one call of ``step`` above what was allocated before it.

    CUDA: the caching allocator's peak statistic. CPU: the allocator events of a memory profile.
    Their "Total Allocated" is a process-wide running count that also keeps blocks an earlier
    profile saw allocated but not freed, so the peak is taken relative to its value just before
    the first event.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return int(max(0, *(m["Total Allocated"] - before for m in memory)))


def _variants(cfg: MoEConfig, ctx: DistContext, tokens: int, args: argparse.Namespace,
              device: torch.device) -> tuple[dict[str, Variant], str]:
    torch.manual_seed(1234)  # the same seed on every rank: replicas must start equal
    data = torch.Generator().manual_seed(1234 + ctx.rank)  # each rank its own tokens
    x = torch.randn(1, tokens, cfg.d_model, generator=data, dtype=cfg.dtype).to(device).requires_grad_()
    variants = {"ours": _ours(cfg, ctx, x), "floor-loop": _floor_loop(cfg, ctx, tokens, device),
                "floor-bmm": _floor_bmm(cfg, ctx, tokens, device)}
    if args.compile:
        torch.manual_seed(1234)  # the same weights as "ours"
        variants["ours-compiled"] = _ours(cfg, ctx, x, compiled=True)
    note = ""
    if args.no_deepspeed:
        note = "DeepSpeed left out (--no-deepspeed)"
    elif cfg.router != "topk" or cfg.top_k > 2:
        note = "DeepSpeed has top-1 and top-2 gating only"
    else:
        ds = _deepspeed(cfg, ctx, x.detach().clone().requires_grad_(True))
        if ds is None:
            note = "DeepSpeed is not installed"
        else:
            variants["deepspeed"] = ds
    return variants, note


def measure(cfg: MoEConfig, ctx: DistContext, tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved medians, peak memory and ratios of every variant at one configuration."""
    device = ctx.device
    variants, note = _variants(cfg, ctx, tokens, args, device)
    times = _interleaved(variants, args.warmup, args.repeats, device)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    peaks = torch.tensor([peak_bytes(step, device) for step in variants.values()], dtype=torch.float64,
                         device=device)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)  # NOTE: collective: the largest rank's peak
    peak = dict(zip(variants, (int(p) for p in peaks.tolist()), strict=True))
    floor_name = min(("floor-bmm", "floor-loop"), key=lambda n: medians[n])
    medians["floor"], peak["floor"] = medians[floor_name], peak[floor_name]
    result: dict[str, Any] = {
        "tokens": tokens, "num_experts": cfg.num_experts, "d_ff": cfg.d_ff, "top_k": cfg.top_k,
        "median_s": medians, "peak_bytes": peak, "floor_is": floor_name,
        "ours_over_floor": medians["ours"] / medians["floor"],
        "ours_peak_over_floor": peak["ours"] / max(peak["floor"], 1), "note": note,
        "expert_tflops": {name: expert_flops(cfg, tokens) / s / 1e12 for name, s in medians.items()}}
    peak_tflops = args.peak_tflops or dense_peak_tflops(device, cfg.dtype)
    if peak_tflops:
        result["fraction_of_peak"] = {name: t / peak_tflops for name, t in result["expert_tflops"].items()}
        result["peak_tflops"] = peak_tflops
    if "ours-compiled" in medians:
        result["compiled_over_eager"] = medians["ours-compiled"] / medians["ours"]
    if "deepspeed" in medians:
        result["ours_over_deepspeed"] = medians["ours"] / medians["deepspeed"]
        result["deepspeed_over_floor"] = medians["deepspeed"] / medians["floor"]
    if args.profile:
        result["profile_shares"] = profile_shares(variants["ours"], steps=max(args.repeats, 3))
    return result


def expert_rows(cfg: MoEConfig, tokens: int) -> int:
    """Rows the experts run for ``tokens`` tokens (one routing group): T·K for top-k (every
    assignment, as the floor runs them; rows dropped by capacity count as work), E·C for expert
    choice, E·slots for Soft MoE."""
    if cfg.router == "soft":
        return cfg.num_experts * cfg.slots_per_expert
    if cfg.router == "expert_choice":
        return cfg.num_experts * min(capacity(cfg, tokens, training=True) or tokens, tokens)
    return tokens * cfg.top_k


def expert_flops(cfg: MoEConfig, tokens: int) -> float:
    """FLOPs of the expert GEMMs of one forward+backward on one rank: the expert rows through 2 (3
    gated) [D, F] products, 2 FLOPs per multiply-add, and the backward's two products per forward one."""
    mats = 3 if cfg.gated else 2
    return 3 * 2 * expert_rows(cfg, tokens) * cfg.d_model * cfg.d_ff * mats


# Dense (no sparsity) peak TFLOP/s of the bf16 tensor cores, from the vendors' data sheets (SXM parts).
_BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def dense_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense bf16 peak where it is known (H100, H200, A100), else None."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _BF16_PEAK_TFLOPS.items() if key in name), None)


def _config(args: argparse.Namespace, num_experts: int, d_ff: int, top_k: int) -> MoEConfig:
    return MoEConfig(d_model=args.d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k,
                     router=args.router, capacity_factor=args.capacity_factor, dtype=args.dtype)


def _sweep_points(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    """(tokens, E, F, K) for every measurement."""
    if args.sweep is None:
        return [(args.tokens, args.num_experts, args.d_ff, args.top_k)]
    default = "1024,2048,4096,8192,16384,32768" if args.sweep == "tokens" else "8,16,32,64,128"
    values = [int(v) for v in (args.values or default).split(",")]
    if args.sweep == "tokens":
        return [(t, args.num_experts, args.d_ff, args.top_k) for t in values]
    points = []
    for E in values:
        if E % args.num_experts or (args.d_ff * args.num_experts) % E:
            raise ValueError(f"--sweep experts: every E must be a multiple of --num-experts "
                             f"{args.num_experts} and divide d_ff·E0 = {args.d_ff * args.num_experts}; "
                             f"got {E}")
        points.append((args.tokens, E, args.d_ff * args.num_experts // E, args.top_k * E // args.num_experts))
    return points


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the interleaved measurements; returns medians (seconds), peaks (bytes) and ratios."""
    ctx = init_distributed(backend=args.backend)
    kept = ctx.device.type == "cpu" and not args.default_malloc and keep_freed_memory()
    if args.overlap_probe:
        return overlap_probe(ctx, args)
    points = [measure(_config(args, E, F, K), ctx, T, args) for T, E, F, K in _sweep_points(args)]
    result: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                   if k not in ("json", "local_rank", "plot")},
        "world_size": ctx.world_size, "ep_size": ctx.ep_size, "device": str(ctx.device),
        "torch": torch.__version__, "malloc": "freed memory kept" if kept else "default",
        "points": points}
    if args.sweep == "tokens":
        result["fitted_exponent"] = {name: fitted_exponent(points, name)
                                     for name in ("ours", "floor", "deepspeed")
                                     if sum(name in p["median_s"] for p in points) >= 2}
    if ctx.rank == 0:
        print(format_table(result))
        if args.json is not None:
            write_json(args.json, result)
        if args.plot is not None and args.sweep is not None:
            plot_sweep(result, args.plot)
    return result


def keep_freed_memory() -> bool:
    """glibc only: serve every block from the heap and never give freed memory back to the system.

    By default glibc maps blocks above a moving threshold (up to 32 MiB) afresh on every allocation
    and trims the heap when its free top grows past twice that, so a step whose working set was
    given back pays a page fault per 4 KiB again. Interleaving variants makes that depend on which
    variant ran before: measured at T=4096, K=1, our step took 113 ms in one run (no faults) and
    129 ms in the next (16k faults per step). With freed memory kept, every variant runs as in a
    steady training loop (and as under the CUDA caching allocator). Returns whether it took effect.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False  # not glibc (macOS, musl): left as it is
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def overlap_probe(ctx: DistContext, args: argparse.Namespace) -> dict[str, Any]:
    """The upper bound on what pipelining the exchange with the expert GEMMs could gain here.

    Times, interleaved: (a) the expert GEMMs of one forward (T·K rows per rank), (b) the dispatch
    all-to-all of those rows alone, (c) both at once (``async_op`` all-to-all while the GEMMs run).
    hidden = (a + b - c) / b is the fraction of the exchange that overlap hides; a pipeline can
    gain at most hidden · b per exchange.
    """
    rows, R = args.tokens * args.top_k, ctx.ep_size
    x = torch.randn(rows, args.d_model, device=ctx.device)
    w = torch.randn(args.d_model, args.d_ff, device=ctx.device)
    out = torch.empty_like(x)
    splits = [rows // R] * (R - 1) + [rows - rows // R * (R - 1)]

    def gemm() -> None:
        x @ w

    def exchange(async_op: bool = False) -> Any:
        return dist.all_to_all_single(out, x, splits, splits, group=ctx.ep_group, async_op=async_op)

    def both() -> None:
        work = exchange(async_op=True)
        gemm()
        work.wait()

    steps = {"gemm": Variant(gemm, []), "exchange": Variant(exchange, []), "both": Variant(both, [])}
    times = _interleaved(steps, args.warmup, args.repeats, ctx.device)
    a, b, c = (statistics.median(times[n]) for n in ("gemm", "exchange", "both"))
    result = {"world_size": ctx.world_size, "ep_size": R, "rows": rows,
              "median_s": {"gemm": a, "exchange": b, "both": c}, "hidden_fraction": (a + b - c) / b}
    if ctx.rank == 0:
        print(f"overlap probe, {R} ranks, {rows} rows of {args.d_model}: GEMM {a * 1e3:.1f} ms, all-to-all "
              f"{b * 1e3:.1f} ms, both at once {c * 1e3:.1f} ms: overlap hides "
              f"{result['hidden_fraction']:.0%} of the exchange")
        if args.json is not None:
            write_json(args.json, result)
    return result


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def fitted_exponent(points: list[dict[str, Any]], name: str) -> float:
    """b in time ≈ a · tokens^b, least squares on the log-log points where ``name`` was measured."""
    measured = [p for p in points if name in p["median_s"]]
    xs = np.log([p["tokens"] for p in measured])
    ys = np.log([p["median_s"][name] for p in measured])
    return float(np.polyfit(xs, ys, 1)[0])


# Profile phases: the record_function scopes of MoE.forward; their autograd nodes (matched by
# sequence number) carry the backward time to the same phase.
_SCOPES = {"moe/router": "router logits", "moe/plan": "gating, plan, aux losses",
           "moe/dispatch": "gather", "moe/experts": "experts (other)", "moe/combine": "combine"}
_COMM = ("alltoall", "all_to_all", "allgather", "all_gather", "allreduce", "all_reduce", "_AllToAll")
_GEMM = ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::_grouped_mm", "_SegmentMM",
         "_CPUGroupedMM", "MmBackward", "BmmBackward", "AddmmBackward", "GroupedMmBackward")


def _label(scope: str, op: str) -> str:
    if any(c in op for c in _COMM):
        return "communication"
    if scope == "moe/experts" and any(op.startswith(g) or f": {g}" in op for g in _GEMM):
        return "expert GEMMs"
    return _SCOPES[scope]


def profile_shares(step: Step, steps: int) -> dict[str, float]:
    """Our step's wall time split by phase (shares of the total), forward and backward together."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total_us = (time.perf_counter() - start) * 1e6
    events = list(prof.events())
    seq_scope: dict[int, str] = {}
    spent: dict[str, float] = {}
    for event in events:
        parent = event.cpu_parent
        if parent is None or parent.name not in _SCOPES:
            continue  # only the direct children of a scope, so nothing is counted twice
        scope = str(parent.name)
        if event.sequence_nr >= 0:
            seq_scope[event.sequence_nr] = scope
        label = _label(scope, event.name)
        spent[label] = spent.get(label, 0.0) + event.cpu_time_total
    for event in events:
        if event.cpu_parent is None and event.name.startswith("autograd::engine::evaluate_function"):
            owner = seq_scope.get(event.sequence_nr)
            if owner is not None:
                label = _label(owner, event.name)
                spent[label] = spent.get(label, 0.0) + event.cpu_time_total
    spent["other (loss, autograd engine, gradient accumulation)"] = total_us - sum(spent.values())
    return {label: us / total_us for label, us in sorted(spent.items(), key=lambda kv: -kv[1])}


def format_table(result: dict[str, Any]) -> str:
    """The human-readable summary of one benchmark run."""
    cfg = result["config"]
    lines = [f"MoE forward+backward, D={cfg['d_model']} capacity={cfg['capacity_factor']} {cfg['dtype']} "
             f"router={cfg['router']}, {result['world_size']} rank(s), ep_size {result['ep_size']}, "
             f"{result['device']}, medians of {cfg['repeats']}, malloc: {result.get('malloc', 'default')}"]
    for point in result["points"]:
        lines.append(f"T={point['tokens']}/rank E={point['num_experts']} F={point['d_ff']} "
                     f"K={point['top_k']}  (floor = {point['floor_is']})")
        lines.append(f"  {'variant':<12}{'median ms':>12}{'x floor':>10}{'peak MiB':>11}{'x floor':>9}"
                     f"{'TFLOP/s':>10}{'of peak':>9}")
        floor, floor_peak = point["median_s"]["floor"], max(point["peak_bytes"]["floor"], 1)
        for name, seconds in point["median_s"].items():
            peak = point["peak_bytes"][name]
            fraction = point.get("fraction_of_peak", {}).get(name)
            lines.append(f"  {name:<12}{seconds * 1e3:>12.1f}{seconds / floor:>10.2f}"
                         f"{peak / 2**20:>11.1f}{peak / floor_peak:>9.2f}"
                         f"{point['expert_tflops'][name]:>10.2f}"
                         f"{'' if fraction is None else f'{fraction * 100:.1f} %':>9}")
        if "compiled_over_eager" in point:
            lines.append(f"  ours compiled / eager = {point['compiled_over_eager']:.2f}")
        if "ours_over_deepspeed" in point:
            lines.append(f"  ours / deepspeed = {point['ours_over_deepspeed']:.2f}")
        if point["note"]:
            lines.append(f"  ({point['note']})")
        for label, share in point.get("profile_shares", {}).items():
            lines.append(f"    {share * 100:5.1f} %  {label}")
    for name, exponent in result.get("fitted_exponent", {}).items():
        lines.append(f"fitted exponent (time ~ tokens^b), {name}: b = {exponent:.3f}")
    return "\n".join(lines)


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Time against the swept value, one line per variant (log-log for tokens)."""
    from .plots import plt, save_figure  # the Agg backend (no display)

    sweep = result["config"]["sweep"]
    key = "tokens" if sweep == "tokens" else "num_experts"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("ours", "floor", "deepspeed"):
        pts = [(p[key], p["median_s"][name] * 1e3) for p in result["points"] if name in p["median_s"]]
        if pts:
            label = name
            if name in result.get("fitted_exponent", {}):
                label += f" (b = {result['fitted_exponent'][name]:.2f})"
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    if sweep == "tokens":
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
    else:
        E0 = result["config"]["num_experts"]
        ax.set_xlabel(f"experts E (F = d_ff·{E0}/E, K = top_k·E/{E0}: fixed active compute)")
    ax.set_ylabel("forward+backward ms (median)")
    ax.set_title(f"{result['world_size']} rank(s), ep_size {result['ep_size']}, {result['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)
