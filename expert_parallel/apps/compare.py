"""Variants of the LM at equal active parameters per token, side by side.

    torchrun --standalone --nproc-per-node 2 examples/compare_ffn.py --steps 400 --out runs/compare
    torchrun --standalone --nproc-per-node 2 examples/compare_ffn.py --suite routing --out runs/routing

``--suite ffn`` (default): dense FFN vs MoE (top-1, top-2, expert choice).
``--suite routing``: 16 experts of one width, softmax + aux loss (top-4) vs sigmoid + aux-loss-free
bias (top-4) vs the DeepSeek-V3 recipe (sigmoid, bias, one shared expert, top-3 of the best 2 of 4
expert groups, a small sequence-wise loss): 4 experts' width per token in all three.

Every variant trains the same steps on the same batches with the same active FFN width per token
(``--d-ff``): dense uses it whole; top-1 experts are that wide; top-2 experts half as wide; expert
choice (capacity factor 1, so one expert per token on average) full width. Writes one run directory
per variant, ``results.md`` (a table) and ``val_loss.png`` (validation curves of all variants).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import train as train_lm

VARIANTS: dict[str, dict[str, Any]] = {
    "dense": dict(ffn="dense"),
    "moe_top1": dict(ffn="moe", router="topk", top_k=1),
    "moe_top2": dict(ffn="moe", router="topk", top_k=2),
    "moe_expert_choice": dict(ffn="moe", router="expert_choice", capacity_factor=1.0),
}
_ROUTING_BASE = dict(ffn="moe", router="topk", num_experts=16, capacity_factor=None)
ROUTING_VARIANTS: dict[str, dict[str, Any]] = {
    "softmax_aux": dict(_ROUTING_BASE, top_k=4, score_func="softmax", balance="aux"),
    "sigmoid_bias": dict(_ROUTING_BASE, top_k=4, score_func="sigmoid", balance="bias"),
    "deepseek_v3": dict(_ROUTING_BASE, top_k=3, shared_experts=1, score_func="sigmoid", balance="bias",
                        expert_groups=4, limited_groups=2, seq_aux_coef=1e-4),
}
SUITES = {"ffn": VARIANTS, "routing": ROUTING_VARIANTS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Same options as ``train`` (shared settings); --out is the parent directory."""
    train_lm.add_arguments(parser)
    parser.add_argument("--suite", choices=sorted(SUITES), default="ffn", help="which variants")
    parser.set_defaults(out=Path("runs/compare"), steps=400, no_plots=False)


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Trains every variant; returns their summaries (rank 0) and writes the table and plot."""
    parent: Path = args.out
    summaries = []
    for name, overrides in SUITES[args.suite].items():
        run_args = argparse.Namespace(**{**vars(args), **overrides, "out": parent / name})
        summary = train_lm.train(run_args)
        if summary:
            summaries.append({"variant": name, **summary})
    if summaries:
        _write_results(parent, summaries)
    return summaries


def _write_results(parent: Path, summaries: list[dict[str, Any]]) -> None:
    rows = ["| variant | active params / token | final train loss | validation loss | MaxVio (last 10 steps) "
            "| tokens/s (median) |", "|---|---|---|---|---|---|"]
    for s in summaries:
        maxvio = "—" if s.get("max_violation_final") is None else f"{s['max_violation_final']:.3f}"
        rows.append(f"| {s['variant']} | {s['active_parameters']:,} | {s['final_loss']:.4f} | "
                    f"{s['val_loss']:.4f} | {maxvio} | {s['tokens_per_s_median']:,.0f} |")
    (parent / "results.md").write_text("\n".join(rows) + "\n")
    (parent / "results.json").write_text(json.dumps(summaries, indent=2))
    _plot_val_loss(parent, summaries)
    _plot_max_violation(parent, summaries)


def _records(parent: Path, variant: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (parent / variant / "metrics.jsonl").open()]


def _plot_val_loss(parent: Path, summaries: list[dict[str, Any]]) -> None:
    """val_loss.png: validation curves of every variant."""
    from .plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for s in summaries:
        val = [(r["step"], r["val_loss"]) for r in _records(parent, s["variant"]) if "val_loss" in r]
        ax.plot(*zip(*val, strict=True), "o-", ms=3, label=s["variant"])
    ax.set(xlabel="step", ylabel="validation loss (nats / byte)",
           title="Same steps, same active parameters per token")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, parent / "val_loss.png")


def _plot_max_violation(parent: Path, summaries: list[dict[str, Any]]) -> None:
    """max_violation.png: MaxVio per step (mean over MoE layers, 10-step moving average)."""
    from .plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for s in summaries:
        records = [r for r in _records(parent, s["variant"]) if "max_violation" in r]
        per_step = [sum(r["max_violation"]) / len(r["max_violation"]) for r in records]
        if not per_step:
            continue
        smooth = [sum(per_step[max(0, i - 9):i + 1]) / len(per_step[max(0, i - 9):i + 1])
                  for i in range(len(per_step))]
        ax.plot([r["step"] for r in records], smooth, lw=1.2, label=s["variant"])
    ax.set(xlabel="step", ylabel="MaxVio (mean over MoE layers)", ylim=(0, None),
           title="Load imbalance: max expert load / mean - 1 (0 = balanced)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, parent / "max_violation.png")
