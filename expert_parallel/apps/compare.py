"""Dense FFN vs MoE (top-1, top-2, expert choice) at equal active parameters per token.

    torchrun --standalone --nproc-per-node 2 examples/compare_ffn.py --steps 400 --out runs/compare

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Same options as ``train`` (shared settings); --out is the parent directory."""
    train_lm.add_arguments(parser)
    parser.set_defaults(out=Path("runs/compare"), steps=400, no_plots=False)


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Trains every variant; returns their summaries (rank 0) and writes the table and plot."""
    parent: Path = args.out
    summaries = []
    for name, overrides in VARIANTS.items():
        run_args = argparse.Namespace(**{**vars(args), **overrides, "out": parent / name})
        summary = train_lm.train(run_args)
        if summary:
            summaries.append({"variant": name, **summary})
    if summaries:
        _write_results(parent, summaries)
    return summaries


def _write_results(parent: Path, summaries: list[dict[str, Any]]) -> None:
    rows = ["| variant | active params / token | final train loss | validation loss | tokens/s (median) |",
            "|---|---|---|---|---|"]
    for s in summaries:
        rows.append(f"| {s['variant']} | {s['active_parameters']:,} | {s['final_loss']:.4f} | "
                    f"{s['val_loss']:.4f} | {s['tokens_per_s_median']:,.0f} |")
    (parent / "results.md").write_text("\n".join(rows) + "\n")
    (parent / "results.json").write_text(json.dumps(summaries, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for s in summaries:
        records = [json.loads(line) for line in (parent / s["variant"] / "metrics.jsonl").open()]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        ax.plot(*zip(*val, strict=True), "o-", ms=3, label=s["variant"])
    ax.set(xlabel="step", ylabel="validation loss (nats / byte)",
           title="Same steps, same active parameters per token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(parent / "val_loss.png", dpi=110)
    plt.close(fig)
