"""PNG plots of a training run (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ..ops.dispatch import link_class


def write_plots(out: Path, records: list[dict[str, Any]], traffic: list[list[float]],
                per_node: int = 0) -> list[Path]:
    """loss.png, and for MoE runs expert_load.png, dropped.png, max_violation.png and traffic.png
    (``per_node``: ranks per node, for its self / intra-node / inter-node split; 0 = one node);
    returns the paths."""
    paths = [_loss(out, records)]
    if records and "expert_counts" in records[0]:
        paths += [_expert_load(out, records), _dropped(out, records), _max_violation(out, records),
                  _traffic(out, traffic, per_node or len(traffic))]
    return paths


def save_figure(fig: Any, path: Path) -> Path:
    """Writes a figure as a PNG (tight layout, 110 dpi; the folder made if needed) and closes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss(out: Path, records: list[dict[str, Any]]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1, label="training")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "loss.png")


def _expert_load(out: Path, records: list[dict[str, Any]]) -> Path:
    layers = len(records[0]["expert_counts"])
    fig, axes = plt.subplots(layers, 1, figsize=(7, 1.8 * layers + 0.8), squeeze=False)
    steps = [r["step"] for r in records]
    for layer, ax in enumerate(axes[:, 0]):
        rows = [r["expert_counts"][layer] for r in records]
        share = [[c / max(sum(row), 1) for c in row] for row in rows]
        image = ax.imshow(list(zip(*share, strict=True)), aspect="auto", cmap="viridis",
                          extent=(steps[0], steps[-1], len(share[0]) - 0.5, -0.5), interpolation="nearest")
        ax.set(ylabel=f"MoE layer {layer}\nexpert")
        fig.colorbar(image, ax=ax, label="share of tokens")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("Expert load per layer (share of kept assignments)")
    return save_figure(fig, out / "expert_load.png")


def _dropped(out: Path, records: list[dict[str, Any]]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in records], [r["dropped"] for r in records], lw=1)
    ax.set(xlabel="step", ylabel="dropped fraction", title="Dropped assignments (mean over MoE layers)")
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "dropped.png")


def _max_violation(out: Path, records: list[dict[str, Any]]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3))
    steps = [r["step"] for r in records]
    for layer in range(len(records[0]["max_violation"])):
        ax.plot(steps, [r["max_violation"][layer] for r in records], lw=1, label=f"MoE layer {layer}")
    ax.set(xlabel="step", ylabel="MaxVio", ylim=(0, None),
           title="Load imbalance: max expert load / mean - 1 (0 = balanced)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "max_violation.png")


def traffic_by_class(traffic: list[list[float]], per_node: int) -> dict[str, float]:
    """Bytes of the matrix summed per link class."""
    out = dict.fromkeys(("self", "intra", "inter"), 0.0)
    for src, row in enumerate(traffic):
        for dst, value in enumerate(row):
            out[link_class(src, dst, per_node)] += value
    return out


def _traffic(out: Path, traffic: list[list[float]], per_node: int) -> Path:
    """The rank-to-rank bytes: a rank's copy to itself greyed out (it crosses no link), the colour
    scale from zero, node boundaries drawn, the self / intra / inter totals in the title."""
    world = len(traffic)
    fig, ax = plt.subplots(figsize=(1.2 * world + 3, 1.0 * world + 2.8))
    mib = [[v / 2**20 for v in row] for row in traffic]
    links = [[math.nan if i == j else mib[i][j] for j in range(world)] for i in range(world)]
    top = max([v for row in links for v in row if not math.isnan(v)], default=0.0)
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad("lightgrey")
    image = ax.imshow(links, cmap=cmap, vmin=0.0, vmax=max(top, 1e-9))
    for i in range(world):
        for j in range(world):
            text = "self\n" + f"{mib[i][j]:.1f}" if i == j else f"{mib[i][j]:.1f}"
            dark = i != j and mib[i][j] < 0.6 * top  # magma is dark below about 60 % of the scale
            ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=8)
    for edge in range(per_node, world, per_node):  # node boundaries
        ax.axhline(edge - 0.5, color="white", lw=2)
        ax.axvline(edge - 0.5, color="white", lw=2)
    split = traffic_by_class(traffic, per_node)
    ax.set(xticks=range(world), yticks=range(world), xlabel="to rank", ylabel="from rank",
           title=f"All-to-all traffic, MiB (dispatch + combine)\nself {split['self'] / 2**20:.1f}, "
                 f"intra-node {split['intra'] / 2**20:.1f}, inter-node {split['inter'] / 2**20:.1f}")
    fig.colorbar(image, ax=ax, label="MiB between ranks (scale from 0)")
    return save_figure(fig, out / "traffic.png")
