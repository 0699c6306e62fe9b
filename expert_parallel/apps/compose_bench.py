"""``expert-parallel compose``: the LM example in every form of composing with torch's training stack,
side by side in one job.

    torchrun --standalone --nproc-per-node 4 -m expert_parallel compose --ep-size 2 --json out.json

Forms: ``sync_gradients`` (the plain model), ``data_parallel`` (DDP), ``fully_shard`` (FSDP2) and
``sync_gradients+checkpointing`` (every block recomputed in the backward). For each: the bytes of
parameters, gradients and AdamW state this rank holds (dense and expert apart), the step time (one
AdamW step on the same batch; every form once per repeat, the order rotated, medians of the slowest
rank) and the peak memory one step allocates above what was allocated before it. Then the peak memory
of ``sync_gradients``' reduction with one flat buffer per dtype against buckets.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..comm import grads
from ..comm.distributed import DistContext, init_distributed
from ..comm.grads import local_part, split_parameters, sync_gradients, unwrap
from .bench import Variant, _interleaved, peak_bytes
from .lm import lm_loss
from .train import add_arguments as train_arguments
from .train import build_model, get_batch, load_corpus

FORMS = {  # name: (--ddp, --fsdp, --activation-checkpointing)
    "sync_gradients": (False, False, False),
    "data_parallel": (True, False, False),
    "fully_shard": (False, True, False),
    "sync_gradients+checkpointing": (False, False, True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The LM example's model options, and the measurement's."""
    train_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)


def _bytes(tensors: list[Tensor]) -> int:
    return sum(local_part(t).numel() * t.element_size() for t in tensors)


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """Bytes this rank holds of parameters, gradients and AdamW state, dense and expert apart."""
    dense, expert = split_parameters(unwrap(model))
    out = {}
    for kind, params in (("dense", dense), ("expert", expert)):
        state = [v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, Tensor)]
        out[kind] = {"parameters": _bytes(list(params)),
                     "gradients": _bytes([p.grad for p in params if p.grad is not None]),
                     "adamw": _bytes(state)}
    return out


def _form(args: argparse.Namespace, ctx: DistContext, name: str, x: Tensor, y: Tensor) -> dict[str, Any]:
    ddp, fsdp, checkpointing = FORMS[name]
    model, forward = build_model(argparse.Namespace(**{**vars(args), "ddp": ddp, "fsdp": fsdp,
                                                       "activation_checkpointing": checkpointing,
                                                       "meta_init": False}), ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def step() -> None:
        optimizer.zero_grad()
        logits, auxes = forward(x)
        lm_loss(logits, auxes, y)[1].backward()
        if not (ddp or fsdp):
            sync_gradients(model, ctx)
        optimizer.step()

    step()  # AdamW's state exists from here on; the gradients stay until the next step
    return {"model": model, "variant": Variant(step, []), "bytes": held_bytes(model, optimizer)}


def _reduction_peaks(args: argparse.Namespace, ctx: DistContext, x: Tensor, y: Tensor) -> dict[str, int]:
    """Peak bytes that sync_gradients allocates, for one flat buffer per dtype and for buckets."""
    model, _ = build_model(argparse.Namespace(**{**vars(args), "ddp": False, "fsdp": False,
                                                 "activation_checkpointing": False, "meta_init": False}), ctx)
    logits, auxes = model(x)
    lm_loss(logits, auxes, y)[1].backward()
    peaks = {}
    for label, size in (("one flat buffer", 2**62), ("25 MiB buckets", 25 * 2**20),
                        ("1 MiB buckets", 2**20), ("256 KiB buckets", 2**18)):
        grads.BUCKET_BYTES = size
        peaks[label] = peak_bytes(lambda: sync_gradients(model, ctx), ctx.device)
    grads.BUCKET_BYTES = 25 * 2**20
    peaks["gradients"] = _bytes([p.grad for p in model.parameters() if p.grad is not None])
    return peaks


def compose(args: argparse.Namespace) -> dict[str, Any]:
    """Measures every form; rank 0 prints the tables (and writes --json). Returns the result."""
    ctx = init_distributed(ep_size=args.ep_size, backend=args.backend)
    data = load_corpus(args.data)
    idx, targets = get_batch(data, args.batch_size, args.seq_len, torch.Generator().manual_seed(args.seed))
    local = args.batch_size // ctx.world_size
    x, y = (t[ctx.rank * local:(ctx.rank + 1) * local].to(ctx.device) for t in (idx, targets))
    forms = {name: _form(args, ctx, name, x, y) for name in FORMS}
    times = _interleaved({n: f["variant"] for n, f in forms.items()}, args.warmup, args.repeats, ctx.device)
    result: dict[str, Any] = {
        "world_size": ctx.world_size, "ep_size": ctx.ep_size, "dp_size": ctx.dp_size,
        "device": str(ctx.device), "tokens_per_rank": local * args.seq_len,
        "median_s": {n: statistics.median(t) for n, t in times.items()},
        "bytes": {n: f["bytes"] for n, f in forms.items()},
        "step_peak_bytes": {n: peak_bytes(f["variant"], ctx.device) for n, f in forms.items()},
        "sync_gradients_peak_bytes": _reduction_peaks(args, ctx, x, y)}
    if ctx.rank == 0:
        print(format_result(result))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
    return result


def format_result(result: dict[str, Any]) -> str:
    mib = 2**20
    lines = [f"{result['world_size']} ranks (ep {result['ep_size']} x dp {result['dp_size']}), "
             f"{result['device']}, {result['tokens_per_rank']} tokens per rank; rank 0's bytes",
             f"  {'form':30s} {'step ms':>8s} {'peak MiB':>9s} {'dense p+g+adam MiB':>19s} "
             f"{'expert p+g+adam MiB':>20s}"]
    for name, seconds in result["median_s"].items():
        held = result["bytes"][name]
        dense, expert = (sum(held[k].values()) / mib for k in ("dense", "expert"))
        lines.append(f"  {name:30s} {seconds * 1e3:8.1f} {result['step_peak_bytes'][name] / mib:9.2f} "
                     f"{dense:19.2f} {expert:20.2f}")
    peaks = result["sync_gradients_peak_bytes"]
    lines.append(f"  sync_gradients peak MiB (gradients {peaks['gradients'] / mib:.2f}): " + ", ".join(
        f"{k} {v / mib:.2f}" for k, v in peaks.items() if k != "gradients"))
    return "\n".join(lines)
