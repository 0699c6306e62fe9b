"""A short MoE training run on random data that prints routing and traffic statistics.

The model is one residual MoE block regressing a fixed random target (a teacher FFN), so the loss
falls and the routing statistics move while the reader watches. It runs as a single process
(``python``) or expert-parallel under torchrun (each rank its own batch, experts sharded).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ..comm.distributed import DistContext, init_distributed
from ..comm.grads import sync_gradients
from ..config import MoEConfig
from ..integrations.deepspeed import prepare_for_deepspeed
from ..layer import MoE
from ..ops.experts import FeedForward
from ..ops.losses import MoEAux


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=128)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--router", default="topk")
    parser.add_argument("--capacity-factor", type=_factor, default=1.25,
                        help="a positive number, or 'none' for dropless")
    parser.add_argument("--slots-per-expert", type=int, default=1, help="soft router only")
    parser.add_argument("--activation", default="gelu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ep-size", type=int, default=None,
                        help="expert-parallel size (default: the world size)")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                        help="default: gloo without a launcher; NCCL under one when every local rank "
                        "has a GPU")
    parser.add_argument("--deepspeed", metavar="CONFIG", default=None,
                        help="train with DeepSpeed's engine using this ds_config.json")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed


def _factor(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def format_stats(step: int, loss: float, aux: MoEAux) -> str:
    """One line of routing statistics."""
    counts = aux.expert_counts.float()
    imbalance = (counts.max() / counts.mean().clamp(min=1e-9)).item()
    return (f"step {step:4d}  loss {loss:.4f}  aux {aux.loss.item():.4f}  "
            f"balance {aux.load_balance_loss.item():.3f}  z {aux.z_loss.item():.3f}  "
            f"entropy {aux.router_entropy.item():.3f}  dropped {aux.dropped_fraction.item():.3f}  "
            f"imbalance {imbalance:.2f}  counts {aux.expert_counts.tolist()}")


StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, MoEAux]]


def make_step(moe: MoE, ctx: DistContext, args: argparse.Namespace) -> StepFn:
    """One training step: the plain path (sync_gradients + AdamW) or DeepSpeed's engine."""
    if args.deepspeed:
        import deepspeed  # optional dependency

        deepspeed.init_distributed(dist_backend=ctx.backend)  # adopts our process group
        groups = prepare_for_deepspeed(moe, ctx)
        engine, *_ = deepspeed.initialize(model=moe, config=args.deepspeed,
                                          optimizer=torch.optim.AdamW(groups, lr=args.lr))

        def ds_step(x_BLD: torch.Tensor, target_BLD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
            y_BLD, aux = engine(x_BLD)
            loss = torch.nn.functional.mse_loss(x_BLD + y_BLD, target_BLD)
            engine.backward(loss + aux.loss)
            engine.step()
            return loss, aux
        return ds_step
    optimizer = torch.optim.AdamW(moe.parameters(), lr=args.lr)

    def step(x_BLD: torch.Tensor, target_BLD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        y_BLD, aux = moe(x_BLD)
        loss = torch.nn.functional.mse_loss(x_BLD + y_BLD, target_BLD)
        optimizer.zero_grad()
        (loss + aux.loss).backward()
        sync_gradients(moe, ctx)
        optimizer.step()
        return loss, aux
    return step


def run(args: argparse.Namespace) -> float:
    """Trains the demo block; returns the final task loss (rank 0's, averaged over ranks)."""
    ctx = init_distributed(ep_size=args.ep_size, backend=args.backend)
    torch.manual_seed(args.seed)  # same seed everywhere: same router, teacher and expert init
    cfg = MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.num_experts,
                    top_k=args.top_k, router=args.router, capacity_factor=args.capacity_factor,
                    slots_per_expert=args.slots_per_expert, activation=args.activation)
    moe = MoE(cfg, ep_group=ctx.ep_group).to(ctx.device)
    teacher = FeedForward(cfg.d_model, 4 * cfg.d_ff, activation="relu").requires_grad_(False).to(ctx.device)
    step_fn = make_step(moe, ctx, args)
    say = print if ctx.rank == 0 else (lambda *a, **k: None)
    say(f"MoE: {cfg.num_experts} experts, top-{cfg.top_k} {cfg.router} routing, capacity factor "
        f"{cfg.capacity_factor}; {ctx.world_size} rank(s) launched by {ctx.launcher}"
        f"{' (DeepSpeed engine)' if args.deepspeed else ''}, ep_size "
        f"{ctx.ep_size}, dp_size {ctx.dp_size}, {moe.experts.num_local} expert(s) per rank")
    data = torch.Generator().manual_seed(args.seed + 1 + ctx.rank)  # each rank its own batches
    start, loss_value = time.perf_counter(), float("nan")
    for step in range(1, args.steps + 1):
        x_BLD = torch.randn(args.batch_size, args.seq_len, cfg.d_model, generator=data).to(ctx.device)
        loss, aux = step_fn(x_BLD, teacher(x_BLD))
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)  # NOTE: collective (for the printout)
        loss_value = mean_loss.item() / ctx.world_size
        if step == 1 or step % 5 == 0 or step == args.steps:
            say(format_stats(step, loss_value, aux))
    tokens = args.steps * args.batch_size * args.seq_len * ctx.world_size
    say(f"{tokens:,} tokens in {time.perf_counter() - start:.1f} s")
    if aux.comm is not None:
        say(f"traffic of rank 0's last call ({aux.comm.mode}): rows sent per peer {aux.comm.sent_rows}, "
            f"bytes per peer (dispatch + combine) {aux.comm.sent_bytes}")
    return loss_value
