"""Train a byte-level Mixture-of-Experts language model, expert-parallel, with metrics and plots.

    torchrun --standalone --nproc-per-node 2 examples/train_lm.py --ep-size 2 --steps 300
    python examples/train_lm.py --steps 50                     # one process, same numbers

The default corpus is the documentation text that ships with every CPython (``pydoc_data.topics``).
Every rank draws the same global batch from one seeded generator and trains on its slice, so runs
with different layouts see the same data and (routing one sequence per group) compute the same
losses.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..comm.distributed import DistContext, init_distributed, launch_env
from ..comm.grads import clip_grad_norm_, sync_gradients, update_expert_bias
from ..config import MoEConfig
from ..integrations.checkpoint import (
    export_single_device,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ..integrations.ddp import data_parallel
from ..integrations.fsdp import fully_shard
from ..ops.dispatch import CommReport
from ..ops.losses import MoEAux
from .lm import LanguageModel, LMConfig, lm_loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training command's options."""
    add = parser.add_argument
    add("--data", type=Path, default=None, help="a text file (default: CPython's pydoc_data.topics)")
    add("--out", type=Path, default=Path("runs/train_lm"), help="run directory")
    add("--ffn", choices=("dense", "moe"), default="moe")
    add("--router", default="topk")
    add("--top-k", type=int, default=2)
    add("--num-experts", type=int, default=8)
    add("--capacity-factor", type=lambda t: None if t.lower() == "none" else float(t), default=1.25,
        help="a positive number, or 'none' for dropless")
    add("--d-ff", type=int, default=512,
        help="active FFN width per token: dense width; experts get d_ff / (experts per token)")
    add("--moe-every", type=int, default=1)
    add("--score-func", choices=("softmax", "sigmoid"), default="softmax", help="token-choice scores")
    add("--balance", choices=("aux", "bias", "none"), default="aux",
        help="load balancing: the aux loss, the aux-loss-free expert bias, or none")
    add("--bias-rate", type=float, default=1e-3, help="with --balance bias: the bias update rate")
    add("--route-scale", type=float, default=1.0, help="gates x this (DeepSeek's routed_scaling_factor)")
    add("--shared-experts", type=int, default=0,
        help="always-on shared experts (each as wide as a routed expert; active width held)")
    add("--expert-groups", type=int, default=None, help="group-limited routing: G expert groups")
    add("--limited-groups", type=int, default=None, help="group-limited routing: M groups per token")
    add("--seq-aux-coef", type=float, default=0.0, help="weight of the sequence-wise balance loss")
    add("--exchange", choices=("flat", "hierarchical"), default="flat",
        help="the all-to-all: flat, or hierarchical (a token crosses to each other node once)")
    add("--d-model", type=int, default=128)
    add("--n-layers", type=int, default=4)
    add("--n-heads", type=int, default=4)
    add("--ep-size", type=int, default=None, help="expert-parallel size (default: world size)")
    add("--backend", choices=("gloo", "nccl"), default=None,
        help="default: gloo without a launcher; NCCL under one when every local rank has a GPU")
    add("--timeout", type=float, default=None,
        help="collective timeout in seconds (default 300): a lost peer becomes an error after it")
    add("--steps", type=int, default=600)
    add("--batch-size", type=int, default=16, help="global batch, sequences per step")
    add("--seq-len", type=int, default=128)
    add("--lr", type=float, default=2e-3)
    add("--seed", type=int, default=0)
    add("--eval-every", type=int, default=50)
    add("--eval-batches", type=int, default=4)
    add("--log-every", type=int, default=25)
    add("--no-plots", action="store_true")
    add("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    add("--resume", action="store_true", help="continue from the latest checkpoint, if there is one")
    add("--ckpt-dir", type=Path, default=None, help="checkpoint directory (default: OUT/checkpoints)")
    add("--export", type=Path, default=None, help="write the single-device state dict here at the end")
    wrap = parser.add_mutually_exclusive_group()
    wrap.add_argument("--ddp", action="store_true",
                      help="DistributedDataParallel through ep.data_parallel (default: ep.sync_gradients)")
    wrap.add_argument("--fsdp", action="store_true", help="FSDP2 through ep.fully_shard: every parameter "
                      "sharded, the experts also over their dp replicas")
    add("--activation-checkpointing", action="store_true",
        help="recompute each block in the backward (torch.utils.checkpoint, non-reentrant)")
    add("--grad-accum", type=int, default=1,
        help="micro-batches per optimizer step (the global batch split in N), synchronised once")
    add("--meta-init", action="store_true",
        help="build on the meta device, then allocate and initialise in place (init_weights)")
    add("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the DeepSpeed launcher


# ---- data ----
def load_corpus(path: Path | None) -> Tensor:
    """Bytes of the corpus as uint8: the file, or CPython's bundled pydoc topics.

    Raises:
        FileNotFoundError: ``path`` is not a file (named as the --data option).
    """
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"--data {path}: no such file")
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def get_batch(data: Tensor, batch: int, seq_len: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows: inputs and next-byte targets, int64 [batch, seq_len]."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
    window = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()
    return window[:, :-1], window[:, 1:]


def model_config(args: argparse.Namespace) -> LMConfig:
    """LMConfig from the options: MoE experts sized so that active FFN parameters match dense."""
    moe = None
    if args.ffn == "moe":
        per_token = args.top_k if args.router in ("topk", "noisy_topk") else 1
        if args.router == "expert_choice":
            per_token = max(1, round(args.capacity_factor or 1))
        per_token += args.shared_experts  # shared experts as wide as a routed one, inside the budget
        moe = MoEConfig(d_model=args.d_model, d_ff=max(1, args.d_ff // per_token),
                        num_experts=args.num_experts, top_k=args.top_k, router=args.router,
                        capacity_factor=args.capacity_factor, eval_capacity_factor=args.capacity_factor,
                        # per-position groups of expert choice hold only the local batch's tokens:
                        # no floor above the formula, so experts per token = capacity factor
                        min_capacity=1, **routing_options(args))
    return LMConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                    max_seq_len=args.seq_len, d_ff=args.d_ff, moe=moe, moe_every=args.moe_every)


def routing_options(args: argparse.Namespace) -> dict[str, Any]:
    """The MoEConfig fields of --score-func, --balance, --route-scale, --shared-experts,
    --expert-groups / --limited-groups, --seq-aux-coef and --exchange."""
    return dict(score_func=args.score_func, route_scale=args.route_scale,
                load_balance_coef=0.01 if args.balance == "aux" else 0.0,
                bias_update_rate=args.bias_rate if args.balance == "bias" else None,
                num_shared_experts=args.shared_experts, num_expert_groups=args.expert_groups,
                num_limited_groups=args.limited_groups, seq_aux_loss_coef=args.seq_aux_coef,
                exchange=args.exchange if args.router != "soft" else "flat")


# ---- metrics ----
@dataclass
class Traffic:
    """All-to-all bytes between ranks, summed over steps and MoE layers: matrix[src][dst].

    ``per_node``: ranks per node (the launcher's LOCAL_WORLD_SIZE; one node without a launcher),
    to split the bytes into self (a rank's copy to itself), intra-node and inter-node.
    """

    world: int
    matrix: list[list[float]] = field(default_factory=list)
    per_node: int = 0

    def __post_init__(self) -> None:
        self.matrix = [[0.0] * self.world for _ in range(self.world)]
        if not self.per_node:
            launch = launch_env()
            self.per_node = launch.local_world_size if launch.launcher != "none" else self.world

    def add(self, sent_WR: Tensor, ep_size: int) -> None:
        for src in range(self.world):
            base = src // ep_size * ep_size
            for peer in range(ep_size):
                self.matrix[src][base + peer] += float(sent_WR[src, peer])


def step_stats(ctx: DistContext, task: Tensor, auxes: list[MoEAux]) -> dict[str, Any]:
    """World-wide statistics of one step.  NOTE: collectives (one all-reduce, one over dp, one gather)."""
    scalars = [task.detach()]
    for aux in auxes:
        scalars += [aux.loss.detach(), aux.load_balance_loss.detach(), aux.z_loss.detach(),
                    aux.dropped_fraction.detach().to(task.dtype), aux.max_violation.detach()]
    packed = torch.stack([s.float() for s in scalars])
    dist.all_reduce(packed)
    packed /= ctx.world_size
    stats: dict[str, Any] = {"loss": packed[0].item()}
    if auxes:
        per_layer = packed[1:].view(len(auxes), 5)
        stats.update(aux_loss=per_layer[:, 0].sum().item(), balance=per_layer[:, 1].mean().item(),
                     z_loss=per_layer[:, 2].mean().item(), dropped=per_layer[:, 3].mean().item(),
                     max_violation=per_layer[:, 4].tolist())
        counts = torch.stack([a.expert_counts for a in auxes])  # global over the EP group
        if ctx.dp_size > 1:
            dist.all_reduce(counts, group=ctx.dp_group)  # ... and summed over the replicas
        stats["expert_counts"] = counts.tolist()
        loads = counts.float()
        stats["imbalance"] = (loads.max(1).values / loads.mean(1).clamp(min=1e-9)).mean().item()
        sent = torch.tensor([sum(a.comm.sent_bytes[q] for a in auxes if a.comm is not None)
                             for q in range(ctx.ep_size)], dtype=torch.float64, device=ctx.device)
        gathered = [torch.empty_like(sent) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, sent)
        stats["sent_bytes"] = torch.stack(gathered).cpu()  # NOTE: host-device sync (metrics)
    return stats


def evaluate(model: LanguageModel, ctx: DistContext, val: Tensor, args: argparse.Namespace) -> float:
    """Mean validation loss over fixed batches (same on every call), averaged over the world."""
    return held_out_loss(model, lambda x, y: model.loss(x, y)[0], ctx, val, args, args.eval_batches)


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, loss_of: Callable[[Tensor, Tensor], Tensor], ctx: DistContext,
                  val: Tensor, args: argparse.Namespace, batches: int) -> float:
    """Mean of ``loss_of(inputs, targets)`` over ``batches`` fixed batches of ``val`` (the same on
    every call), each rank on its slice, in eval mode, averaged over the world."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 12345)
    local = args.batch_size // ctx.world_size
    total = torch.zeros((), device=ctx.device)
    for _ in range(batches):
        x, y = get_batch(val, args.batch_size, args.seq_len, gen)
        sl = slice(ctx.rank * local, (ctx.rank + 1) * local)
        total += loss_of(x[sl].to(ctx.device), y[sl].to(ctx.device))
    dist.all_reduce(total)  # NOTE: collective
    model.train()
    return total.item() / (ctx.world_size * batches)


def _line(rec: dict[str, Any]) -> str:
    text = f"step {rec['step']:5d}  loss {rec['loss']:.4f}"
    if "val_loss" in rec:
        text += f"  val {rec['val_loss']:.4f}"
    if "aux_loss" in rec:
        maxvio = sum(rec["max_violation"]) / len(rec["max_violation"])
        text += (f"  aux {rec['aux_loss']:.4f} (balance {rec['balance']:.3f}, z {rec['z_loss']:.2f})"
                 f"  dropped {rec['dropped']:.3f}  imbalance {rec['imbalance']:.2f}  maxvio {maxvio:.2f}")
    return text + f"  {rec['tokens_per_s']:,.0f} tok/s"


@dataclass
class Run:
    """Everything one training run holds: the job, the model and optimizer, the data and the logs."""

    args: argparse.Namespace
    ctx: DistContext
    model: LanguageModel
    """The model (sharded in place by --fsdp); ``forward`` is what runs it (DDP's wrapper)."""
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_data: Tensor
    val_data: Tensor
    gen: torch.Generator
    """Draws the global batches; seeded alike on every rank, so every rank draws the same ones."""
    traffic: Traffic
    records: list[dict[str, Any]]

    @property
    def leader(self) -> bool:
        return self.ctx.rank == 0

    def local_slice(self, batch: Tensor) -> Tensor:
        """This rank's sequences of a global batch (or micro-batch), on this rank's device."""
        local = batch.shape[0] // self.ctx.world_size
        return batch[self.ctx.rank * local:(self.ctx.rank + 1) * local].to(self.ctx.device)

    def micro_batches(self, batch: Tensor) -> list[Tensor]:
        """This rank's slice of each of the --grad-accum micro-batches of a global batch."""
        return [self.local_slice(part) for part in batch.chunk(self.args.grad_accum)]


def build_model(args: argparse.Namespace, ctx: DistContext) -> tuple[LanguageModel, torch.nn.Module]:
    """The model on this rank's device, wrapped as the options say; (model, the module to call)."""
    torch.manual_seed(args.seed)
    with torch.device("meta") if args.meta_init else contextlib.nullcontext():
        model = LanguageModel(model_config(args), ep_group=ctx.ep_group)
    model.activation_checkpointing = args.activation_checkpointing
    if args.fsdp:  # sharded first: a meta model is then allocated shard by shard
        fully_shard(model, ctx)
    if args.meta_init:
        model.to_empty(device=ctx.device)
        model.init_weights()
    model.to(ctx.device)
    return model, data_parallel(model, ctx) if args.ddp else model


def setup(args: argparse.Namespace) -> Run:
    """Process groups, data, the model on this rank's device and its optimizer."""
    ctx = init_distributed(ep_size=args.ep_size, backend=args.backend, timeout=args.timeout)
    if args.grad_accum < 1 or args.batch_size % (ctx.world_size * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the world size "
                         f"{ctx.world_size} times --grad-accum {args.grad_accum}")
    data = load_corpus(args.data)
    split = int(0.9 * data.numel())
    model, forward = build_model(args, ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    run = Run(args, ctx, model, forward, optimizer, data[:split], data[split:],
              gen=torch.Generator().manual_seed(args.seed + 1), traffic=Traffic(ctx.world_size),
              records=[])
    if run.leader:
        args.out.mkdir(parents=True, exist_ok=True)
        tqdm.write(f"{len(data):,} bytes of text; {ctx.world_size} rank(s) launched by {ctx.launcher}, "
                   f"ep_size {ctx.ep_size}, dp_size {ctx.dp_size}, {ctx.backend} on {ctx.device}; "
                   f"{model.active_parameters_per_token():,} active parameters per token")
    return run


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One optimizer step on the next global batch; returns the step's record (world-wide stats)."""
    args, ctx, model = run.args, run.ctx, run.model
    start = time.perf_counter()
    x, y = get_batch(run.train_data, args.batch_size, args.seq_len, run.gen)
    run.optimizer.zero_grad()
    task, auxes = accumulate(run, run.micro_batches(x), run.micro_batches(y))
    if not (args.ddp or args.fsdp):  # those reduced in the backward
        sync_gradients(model, ctx)
    clip_grad_norm_(model, 1.0, ctx)
    run.optimizer.step()
    update_expert_bias(model, ctx)  # aux-loss-free balancing (a no-op without an expert bias)
    stats = step_stats(ctx, task, auxes)
    elapsed = time.perf_counter() - start
    if "sent_bytes" in stats:
        run.traffic.add(stats.pop("sent_bytes"), ctx.ep_size)
    rec = {"step": step, **stats, "tokens_per_s": args.batch_size * args.seq_len / elapsed}
    if step % args.eval_every == 0 or step == args.steps:
        rec["val_loss"] = evaluate(model, ctx, run.val_data, args)
    return rec


def accumulate(run: Run, xs: list[Tensor], ys: list[Tensor]) -> tuple[Tensor, list[MoEAux]]:
    """Forward and backward of every micro-batch (loss / N), the gradient synchronisation of the
    wrappers only with the last; returns the mean task loss and the MoE statistics of the whole
    batch (expert counts and traffic summed over the micro-batches, the rest averaged)."""
    tasks, per_micro = [], []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        last = i == len(xs) - 1
        if isinstance(run.model, FSDPModule):
            run.model.set_requires_gradient_sync(last)
        forward = run.forward
        no_sync = (forward.no_sync() if isinstance(forward, DistributedDataParallel) and not last
                   else contextlib.nullcontext())
        with no_sync:
            logits, auxes = run.forward(x)
            task, total, auxes = lm_loss(logits, auxes, y)
            (total / len(xs)).backward()
        tasks.append(task.detach())
        per_micro.append(auxes)
    return torch.stack(tasks).mean(), merge_auxes(per_micro)


def merge_auxes(per_micro: list[list[MoEAux]]) -> list[MoEAux]:
    """One MoEAux per layer for several micro-batches: counts and traffic summed, the rest averaged."""
    if len(per_micro) == 1:
        return per_micro[0]
    merged = []
    for layer in zip(*per_micro, strict=True):
        mean = {name: torch.stack([getattr(a, name) for a in layer]).float().mean()
                for name in ("loss", "load_balance_loss", "z_loss", "router_entropy", "dropped_fraction",
                             "seq_balance_loss", "max_violation")}
        comms = [a.comm for a in layer if a.comm is not None]
        comm = comms[0] if comms else None
        if comm is not None:
            def total(field: str, reports: list[CommReport] = comms) -> tuple[int, ...]:
                return tuple(int(sum(v)) for v in zip(*(getattr(r, field) for r in reports), strict=True))
            comm = dataclasses.replace(comm, sent_rows=total("sent_rows"), recv_rows=total("recv_rows"),
                                       meta_bytes=total("meta_bytes"))
        merged.append(dataclasses.replace(layer[0], **mean, comm=comm,
                                          expert_counts=sum(a.expert_counts for a in layer)))
    return merged


def log_step(run: Run, rec: dict[str, Any], bar: tqdm) -> None:
    """Rank 0: the record into metrics.jsonl, the progress bar, and a line every --log-every steps."""
    if not run.leader:
        return
    run.records.append(rec)
    with (run.args.out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")
    bar.set_postfix(loss=f"{rec['loss']:.3f}")
    if rec["step"] == 1 or rec["step"] % run.args.log_every == 0 or "val_loss" in rec:
        tqdm.write(_line(rec))


def finish(run: Run) -> dict[str, Any]:
    """Summary and plots (rank 0), and the single-device export if asked."""
    args, out = run.args, run.args.out
    summary = summarize(run.records, args, run.model.active_parameters_per_token()) if run.leader else {}
    if run.leader and not args.no_plots:
        from .plots import write_plots
        write_plots(out, run.records, run.traffic.matrix, run.traffic.per_node)
    if run.leader:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.export is not None:
        export_single_device(run.model, args.export, run.ctx)
    return summary


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the training; returns a summary (initial/final loss, validation loss, tokens/s)."""
    run = setup(args)
    ckpt_dir: Path = args.ckpt_dir or args.out / "checkpoints"
    first = resume(run, ckpt_dir) if args.resume else 1
    if run.leader:
        (args.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.records))
    bar = tqdm(range(first, args.steps + 1), disable=not run.leader, desc="train", unit="step",
               initial=first - 1, total=args.steps)
    for step in bar:
        log_step(run, train_step(run, step), bar)
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            save_checkpoint(ckpt_dir, run.model, run.optimizer, run.ctx, step, meta={
                "data_rng": run.gen.get_state(), "traffic": run.traffic.matrix})
    return finish(run)


def resume(run: Run, ckpt_dir: Path) -> int:
    """Loads the latest checkpoint (any layout) and the metrics up to it; returns the next step."""
    path = latest_checkpoint(ckpt_dir, run.ctx)
    if path is None:
        return 1
    ctx = run.ctx
    meta = load_checkpoint(path, run.model, run.optimizer, ctx,
                           meta={"data_rng": run.gen.get_state(), "traffic": run.traffic.matrix})
    run.gen.set_state(meta["data_rng"])
    if len(meta["traffic"]) == ctx.world_size:  # same world: keep counting the traffic
        run.traffic.matrix = meta["traffic"]
    metrics = run.args.out / "metrics.jsonl"
    if ctx.rank == 0 and metrics.exists():
        old = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        run.records.extend(r for r in old if r["step"] <= meta["step"])
    if ctx.rank == 0:
        tqdm.write(f"resumed from {path} (step {meta['step']})")
    return int(meta["step"]) + 1


def summarize(records: list[dict[str, Any]], args: argparse.Namespace,
              active_parameters: int = 0) -> dict[str, Any]:
    """Initial and final training loss (means of the first and last 10 steps), validation, speed,
    and the MaxVio of the last 10 steps (mean over layers and steps; MoE runs)."""
    losses = [r["loss"] for r in records]
    maxvio = [sum(r["max_violation"]) / len(r["max_violation"])
              for r in records[-10:] if "max_violation" in r]
    speeds = sorted(r["tokens_per_s"] for r in records[len(records) // 5:]) or [math.nan]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    return {"steps": len(records), "initial_loss": sum(losses[:10]) / len(losses[:10]),
            "final_loss": sum(losses[-10:]) / len(losses[-10:]), "val_loss": vals[-1] if vals else None,
            "tokens_per_s_median": speeds[len(speeds) // 2], "ffn": args.ffn, "router": args.router,
            "top_k": args.top_k, "num_experts": args.num_experts, "active_parameters": active_parameters,
            "max_violation_final": sum(maxvio) / len(maxvio) if maxvio else None}
