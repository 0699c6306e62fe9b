"""Run under torchrun (or as one process): MoE layers composed with the PyTorch training stack, each
checked against the single-device reference trained on the global batch.

    torchrun --standalone --nproc-per-node 4 tests/workers/compose.py --ep-size 2

- activation checkpointing (reentrant and not) around blocks holding MoE layers: the same gradients,
  the routers' selection counts and the call counters counted once, against no checkpointing and
  against the reference;
- ep.data_parallel: several AdamW steps, each of two micro-batches (the first under no_sync()), with
  the aux-loss-free bias updated once per step, equal to the reference and to sync_gradients on the
  unwrapped model; a checkpoint saved from the wrapped model loads into a plain one;
- plain DistributedDataParallel: refused at the first forward, naming ep.data_parallel;
  sync_gradients on a data_parallel model refused;
- MoE layers built on the meta device and reset equal a direct build; different seeds refused.
Prints "ALL OK <n>" on rank 0.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import expert_parallel as ep
from expert_parallel.comm import grads
from expert_parallel.comm.distributed import full_tensor
from expert_parallel.comm.grads import unwrap
from tests.workers.checks import check_parser, run_checks

D, F, E, L, B = 8, 12, 8, 6, 2
CFG = ep.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=2, capacity_factor=1.0, score_func="sigmoid",
                   bias_update_rate=0.01, num_shared_experts=1, activation="swiglu")
TOL = dict(rtol=1e-5, atol=1e-6)


class Block(nn.Module):
    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.moe = ep.MoE(CFG, ep_group=group)

    def forward(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_BLD, aux = self.moe(self.norm(x_BLD))
        return x_BLD + y_BLD, aux.loss


class Net(nn.Module):
    """A projection, then two MoE blocks, each optionally under activation checkpointing."""

    def __init__(self, group: dist.ProcessGroup | None, checkpointing: str = "none") -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block(group) for _ in range(2)])
        self.checkpointing = checkpointing

    def forward(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_BLD, total = self.proj(x_BLD), x_BLD.new_zeros(())
        for block in self.blocks:
            if self.checkpointing == "none":
                x_BLD, aux_loss = block(x_BLD)
            else:
                x_BLD, aux_loss = checkpoint(block, x_BLD, use_reentrant=self.checkpointing == "reentrant")
            total = total + aux_loss
        return x_BLD, total


def build(ctx: ep.DistContext, checkpointing: str = "none", reference: bool = False) -> Net:
    """The model on this rank's device: expert-parallel, or the single-device reference."""
    torch.manual_seed(0)
    return Net(None if reference else ctx.ep_group, checkpointing).to(ctx.device)


def loss_of(out: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    y_BLD, aux_loss = out
    return (y_BLD - target).pow(2).mean() + aux_loss


def batches(ctx: ep.DistContext, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's batch and target (the same on every rank; each uses its own)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, L, D, generator=g).to(ctx.device) for _ in range(ctx.world_size)]
    ts = [torch.randn(B, L, D, generator=g).to(ctx.device) for _ in range(ctx.world_size)]
    return xs, ts


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-device state dict of a model in any layout (experts gathered)."""
    return ep.checkpoint.full_state_dict(model)


def full_grads(model: nn.Module, ctx: ep.DistContext | None) -> dict[str, torch.Tensor]:
    """Every gradient in the single-device layout: shards gathered (fully_shard), experts over ep."""
    grads = {}
    for name, p in unwrap(model).named_parameters():
        assert p.grad is not None, name
        grad = full_tensor(p.grad).clone()
        if ".experts." in name and ctx is not None and ctx.ep_size > 1:
            parts = [torch.empty_like(grad) for _ in range(ctx.ep_size)]
            dist.all_gather(parts, grad.contiguous(), group=ctx.ep_group)
            grad = torch.cat(parts)
        grads[name] = grad
    return grads


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str, **tol: float) -> None:
    assert a.keys() == b.keys(), (what, sorted(a.keys() ^ b.keys()))
    for key in a:
        torch.testing.assert_close(a[key], b[key], **(tol or TOL),
                                   msg=lambda m, key=key: f"{what} {key}: {m}")


def loads(model: Net, ctx: ep.DistContext | None) -> list[torch.Tensor]:
    """Each router's selection counts, summed over the job."""
    out = []
    for block in model.blocks:
        load = block.moe.router.expert_load.clone()
        if ctx is not None and ctx.world_size > 1:
            dist.all_reduce(load)
        out.append(load)
    return out


def reference_step(ref: Net, xs: list[torch.Tensor], ts: list[torch.Tensor], scale: float = 1.0) -> None:
    """The single-device gradient of the mean per-rank loss (group boundaries at the ranks)."""
    loss = sum(loss_of(ref(x), t) for x, t in zip(xs, ts, strict=True)) / len(xs)
    (loss * scale).backward()


def check_activation_checkpointing(ctx: ep.DistContext) -> None:
    xs, ts = batches(ctx, 1)
    ref = build(ctx, reference=True)
    reference_step(ref, xs, ts)
    results = {}
    for mode in ("none", "reentrant", "non_reentrant"):
        model = build(ctx, mode)
        loss_of(model(xs[ctx.rank]), ts[ctx.rank]).backward()
        ep.sync_gradients(model, ctx)
        results[mode] = (full_grads(model, ctx), loads(model, ctx), [b.moe.calls for b in model.blocks])
    for mode, (got_grads, load, calls) in results.items():
        same(got_grads, full_grads(ref, None), f"checkpointing={mode}: gradient of")
        for got, want in zip(load, loads(ref, None), strict=True):
            assert torch.equal(got, want), (mode, got, want)  # counted once, as the reference
        assert calls == [1, 1], (mode, calls)


def accumulate(model: nn.Module, ctx: ep.DistContext, step: int, form: str) -> None:
    """Two micro-batches (losses halved), synchronised once: after the first backward for the plain
    model (sync_gradients), for the others by their own means (no_sync, set_requires_gradient_sync)."""
    for micro in range(2):
        xs, ts = batches(ctx, 10 * step + micro)
        first = micro == 0
        if form == "data_parallel" and first:
            assert isinstance(model, DistributedDataParallel)
            with model.no_sync():
                (loss_of(model(xs[ctx.rank]), ts[ctx.rank]) / 2).backward()
            continue
        if form == "fully_shard":
            assert isinstance(model, FSDPModule)
            model.set_requires_gradient_sync(not first)
        (loss_of(model(xs[ctx.rank]), ts[ctx.rank]) / 2).backward()
    if form == "plain":
        ep.sync_gradients(model, ctx)


def train(model: nn.Module, ctx: ep.DistContext, steps: int, form: str,
          ref_grads: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
    """AdamW steps of two accumulated micro-batches each, the bias updated once per step; the first
    step's gradients are checked against the reference's (AdamW would hide a wrong scale)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        accumulate(model, ctx, step, form)
        if step == 0:
            same(full_grads(model, ctx), ref_grads, f"{form}: accumulated gradient of")
        ep.clip_grad_norm_(model, 0.5, ctx)
        opt.step()
        opt.zero_grad()
        ep.update_expert_bias(model, ctx)
    return opt


def train_reference(ref: Net, ctx: ep.DistContext, steps: int) -> dict[str, torch.Tensor]:
    """The same steps on the global batches in one process; returns the first step's gradients."""
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    first: dict[str, torch.Tensor] = {}
    for step in range(steps):
        for micro in range(2):
            reference_step(ref, *batches(ctx, 10 * step + micro), scale=0.5)
        first = first or full_grads(ref, None)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        ep.update_expert_bias(ref)
    return first


def check_data_parallel(ctx: ep.DistContext, steps: int = 3) -> None:
    ref = build(ctx, reference=True)
    ref_grads = train_reference(ref, ctx, steps)
    plain = build(ctx)
    grads.BUCKET_BYTES = 256  # sync_gradients in many buckets (a few gradients each)
    train(plain, ctx, steps, "plain", ref_grads)
    grads.BUCKET_BYTES = 25 * 2**20
    ddp = ep.data_parallel(build(ctx), ctx)
    train(ddp, ctx, steps, "data_parallel", ref_grads)
    # reentrant checkpointing runs each block's backward as a nested pass: still one reduction
    recomputed = ep.data_parallel(build(ctx, "reentrant"), ctx)
    train(recomputed, ctx, steps, "data_parallel", ref_grads)
    same(full_state(recomputed), full_state(ref), "data_parallel + reentrant checkpointing:",
         rtol=1e-4, atol=1e-5)
    want = full_state(ref)
    same(full_state(plain), want, f"sync_gradients, {steps} steps:", rtol=1e-4, atol=1e-5)
    same(full_state(ddp), want, f"data_parallel, {steps} steps:", rtol=1e-4, atol=1e-5)
    with tempfile.TemporaryDirectory() as scratch:
        path = [scratch]
        dist.broadcast_object_list(path)  # rank 0's directory for the job
        ep.save_checkpoint(path[0], ddp, None, ctx, steps)
        fresh = build(ctx)
        ep.load_checkpoint(ep.latest_checkpoint(path[0], ctx), fresh, None, ctx)
        dist.barrier()
    same(full_state(fresh), full_state(ddp), "loaded from a data_parallel checkpoint:", rtol=0, atol=0)
    expect_error(lambda: ep.sync_gradients(ddp, ctx), ValueError, "ep.data_parallel")


def check_fully_shard(ctx: ep.DistContext, steps: int = 3) -> None:
    """fully_shard: the accumulated gradients and 3 AdamW steps equal the reference; a checkpoint
    saved sharded loads into the plain layout (also at another EP size) and back, with the next step
    equal; bf16 parameters
    with fp32 reduction (FSDP2's MixedPrecisionPolicy) give the gradients at bf16 resolution."""
    ref = build(ctx, reference=True)
    ref_grads = train_reference(ref, ctx, steps)
    sharded = ep.fully_shard(build(ctx), ctx)
    opt = train(sharded, ctx, steps, "fully_shard", ref_grads)
    same(full_state(sharded), full_state(ref), f"fully_shard, {steps} steps:", rtol=1e-4, atol=1e-5)
    expect_error(lambda: ep.sync_gradients(sharded, ctx), ValueError, "ep.fully_shard")
    with tempfile.TemporaryDirectory() as scratch:
        path = [scratch]
        dist.broadcast_object_list(path)  # rank 0's directory for the job
        ep.save_checkpoint(f"{path[0]}/sharded", sharded, opt, ctx, steps)
        plain = build(ctx)
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
        ep.load_checkpoint(ep.latest_checkpoint(f"{path[0]}/sharded", ctx), plain, plain_opt, ctx)
        same(full_state(plain), full_state(sharded), "sharded -> plain:", rtol=0, atol=0)
        ep.save_checkpoint(f"{path[0]}/plain", plain, plain_opt, ctx, steps)
        # at another expert-parallel size (the same job, a second (dp, ep) mesh)
        sizes = [n for n in range(1, ctx.world_size + 1)
                 if ctx.world_size % n == 0 and CFG.num_experts % n == 0 and n != ctx.ep_size]
        other = ep.init_distributed(ep_size=sizes[0] if sizes else ctx.ep_size)
        resized = build(other)
        ep.load_checkpoint(ep.latest_checkpoint(f"{path[0]}/sharded", other), resized, None, other)
        same(full_state(resized), full_state(sharded), f"sharded -> ep_size {other.ep_size}:", rtol=0, atol=0)
        again = ep.fully_shard(build(ctx), ctx)
        again_opt = torch.optim.AdamW(again.parameters(), lr=1e-2)
        ep.load_checkpoint(ep.latest_checkpoint(f"{path[0]}/plain", ctx), again, again_opt, ctx)
        dist.barrier()
    same(full_state(again), full_state(plain), "plain -> sharded:", rtol=0, atol=0)
    for model, optimizer, form in ((plain, plain_opt, "plain"), (again, again_opt, "fully_shard")):
        accumulate(model, ctx, steps, form)
        optimizer.step()
    same(full_state(again), full_state(plain), "the step after loading:", rtol=1e-5, atol=1e-6)
    low = ep.fully_shard(build(ctx), ctx, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                         reduce_dtype=torch.float32))
    accumulate(low, ctx, 0, "fully_shard")
    # The oracle: the reference model cast to bf16 (bf16 routing can differ from fp32's near ties)
    ref_low = build(ctx, reference=True).to(torch.bfloat16)
    for micro in range(2):
        xs, ts = batches(ctx, micro)
        losses = [loss_of(ref_low(x.bfloat16()), t.bfloat16()).float() for x, t in zip(xs, ts, strict=True)]
        (sum(losses) / len(losses) / 2).backward()
    want = full_grads(ref_low, None)
    for key, grad in full_grads(low, ctx).items():
        assert grad.dtype == torch.float32, key  # fp32 master shards, fp32 reduction
        error = (grad - want[key].float()).norm() / want[key].float().norm()
        assert error < 0.02, f"bf16 parameters, gradient of {key}: relative error {error:.4f}"


def expect_error(call: Callable[[], object], kind: type[Exception], text: str) -> None:
    try:
        call()
    except kind as err:
        assert text in str(err), str(err)
    else:
        raise AssertionError(f"no {kind.__name__} naming {text!r}")


def check_plain_ddp_refused(ctx: ep.DistContext) -> None:
    model = build(ctx)
    before = full_state(model)
    ddp = DistributedDataParallel(model)
    xs, _ = batches(ctx, 5)
    if ctx.ep_size == 1:  # every expert replicated: plain DDP is right
        ddp(xs[ctx.rank])
        same(full_state(model), before, "ep_size 1: plain DDP keeps", rtol=0, atol=0)
        return
    expect_error(lambda: ddp(xs[ctx.rank]), RuntimeError, "ep.data_parallel")


def check_meta_init(ctx: ep.DistContext) -> None:
    """An MoE built on the meta device after a seed, moved with to_empty and reset, equals one built
    directly after that seed (this rank's experts); built after different seeds on the ranks,
    reset_parameters refuses (the replica check)."""
    for seed in (0, 1):
        torch.manual_seed(seed)
        direct = ep.MoE(CFG, ep_group=ctx.ep_group).to(ctx.device)
        torch.manual_seed(seed)
        with torch.device("meta"):
            meta = ep.MoE(CFG, ep_group=ctx.ep_group)
        meta.to_empty(device=ctx.device).reset_parameters()
        same(meta.state_dict(), direct.state_dict(), f"seed {seed}, meta build, reset:", rtol=0, atol=0)
    # meta -> fully_shard -> to_empty -> reset: each rank's shards of the direct build's values
    torch.manual_seed(2)
    direct = ep.MoE(CFG, ep_group=ctx.ep_group).to(ctx.device)
    torch.manual_seed(2)
    sharded = ep.fully_shard(ep.MoE(CFG, ep_group=ctx.ep_group, device="meta"), ctx)
    sharded.to_empty(device=ctx.device)
    sharded.reset_parameters()
    same(full_state(sharded), full_state(direct), "meta build, fully_shard, reset:", rtol=0, atol=0)
    torch.manual_seed(ctx.rank)  # a different seed on every rank
    odd = ep.MoE(CFG, ep_group=ctx.ep_group, device="meta").to_empty(device=ctx.device)
    if ctx.ep_size > 1:
        expect_error(odd.reset_parameters, ValueError, "torch.manual_seed")


CHECKS: dict[str, Callable[[ep.DistContext], None]] = {
    "activation_checkpointing": check_activation_checkpointing,
    "data_parallel": check_data_parallel,
    "plain_ddp_refused": check_plain_ddp_refused,
    "meta_init": check_meta_init,
    "fully_shard": check_fully_shard,
}


def main() -> int:
    parser = check_parser(CHECKS)
    parser.add_argument("--num-experts", type=int, default=E, help="fewer local experts than dp replicas: "
                        "fully_shard shards the experts' dim 1")
    args = parser.parse_args()
    global CFG
    CFG = CFG.replace(num_experts=args.num_experts)
    ctx = ep.init_distributed(ep_size=args.ep_size, timeout=120)
    return run_checks(CHECKS, args.checks.split(","), ctx)


if __name__ == "__main__":
    sys.exit(main())
