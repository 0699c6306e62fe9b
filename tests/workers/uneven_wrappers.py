"""Run under torchrun: the training wrappers (ep.sync_gradients, ep.data_parallel, ep.fully_shard) in
the uneven cases of issue #33, each against the single-device model run in this process.

    torchrun --standalone --nproc-per-node 2 tests/workers/uneven_wrappers.py

- fsdp_fp16: ep.fully_shard with fp16 gradients (an fp16 model without a policy, and fp32 parameters
  under MixedPrecisionPolicy(param_dtype=float16)) at every expert-parallel size the world allows
  (dp 1 included): the gradients equal the reference model's, cast to fp16;
- twice: under ep.data_parallel one MoE layer applied twice in a forward, under reentrant
  checkpointing (both calls, one call, and nested two deep) and non-reentrant: one reduction of the
  experts per backward, gradients equal to the reference;
- empty: a rank with no tokens (x of shape [0, L, D], then [B, 0, D] on another rank) trains two SGD
  steps and evaluates under sync_gradients, data_parallel and fully_shard at every expert-parallel
  size: the gradients are the single-device gradients of the job-wide loss (sum of the per-token
  losses over the job / the job's token count), the outputs the reference's.

The reference never goes through a wrapper: one ``Net(None)`` on the concatenated tokens (dropless
top-k routing and shared experts act per token, so the grouping does not change its numbers).
Prints "ALL OK <n>" on rank 0.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import expert_parallel as ep
from expert_parallel.comm.distributed import full_tensor
from expert_parallel.comm.grads import unwrap
from tests.workers.checks import check_parser, run_checks

D, F, E, L, B = 8, 12, 4, 3, 2
CFG = ep.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=2, capacity_factor=None,
                   eval_capacity_factor=None, num_shared_experts=1, activation="swiglu")
TOL = dict(rtol=1e-5, atol=1e-6)


class Block(nn.Module):
    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.moe = ep.MoE(CFG, ep_group=group)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return x_BLD + self.moe(self.norm(x_BLD))[0]


class Net(nn.Module):
    """A projection, then one block applied ``calls`` times, each call as ``mode`` says: "none",
    "reentrant" / "non_reentrant" (torch.utils.checkpoint), "mixed" (the first call plain, the
    second reentrant: the backward meets the nested pass first) or "nested" (a reentrant checkpoint
    of a reentrant checkpoint)."""

    def __init__(self, group: dist.ProcessGroup | None, calls: int = 1, mode: str = "none") -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block(group)])
        self.calls, self.mode = calls, mode

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_BLD = self.proj(x_BLD)
        for call in range(self.calls):
            x_BLD = self._call(call, x_BLD)
        return x_BLD

    def _call(self, call: int, x_BLD: torch.Tensor) -> torch.Tensor:
        block = self.blocks[0]
        if self.mode == "none" or (self.mode == "mixed" and call == 0):
            return block(x_BLD)
        if self.mode == "nested":
            return checkpoint(lambda x: checkpoint(block, x, use_reentrant=True), x_BLD, use_reentrant=True)
        return checkpoint(block, x_BLD, use_reentrant=self.mode != "non_reentrant")


def build(group: dist.ProcessGroup | None, calls: int = 1, mode: str = "none") -> Net:
    """The model after the same seed on every rank: expert-parallel, or the reference (group None)."""
    torch.manual_seed(0)
    return Net(group, calls, mode)


def token_loss_sum(y_BLD: torch.Tensor, t_BLD: torch.Tensor) -> torch.Tensor:
    """Σ over the tokens of the per-token loss (squared error summed over D); 0 for no tokens."""
    return (y_BLD.float() - t_BLD.float()).pow(2).sum()


def rank_loss(y_BLD: torch.Tensor, t_BLD: torch.Tensor, ctx: ep.DistContext) -> torch.Tensor:
    """This rank's share of the job-wide loss Σ_job ℓ / N_job, times the world size: every wrapper
    averages the ranks' gradients (divides by W), so the gradient is that of Σ_job ℓ / N_job."""
    count = torch.tensor([float(t_BLD.shape[0] * t_BLD.shape[1])])
    dist.all_reduce(count)  # NOTE: collective: the job's token count
    return token_loss_sum(y_BLD, t_BLD) * ctx.world_size / count[0]


def batches(ctx: ep.DistContext, seed: int, empty: dict[int, tuple[int, int, int]]
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's input and target (the same on every rank; each uses its own); rank r of
    ``empty`` gets that shape instead of [B, L, D]."""
    g = torch.Generator().manual_seed(seed)
    shapes = [empty.get(r, (B, L, D)) for r in range(ctx.world_size)]
    xs = [torch.randn(s, generator=g) for s in shapes]
    return xs, [torch.randn(s, generator=g) for s in shapes]


def tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    """The job's tokens in rank order, as one sequence [1, N, D]."""
    return torch.cat([p.reshape(1, -1, D) for p in parts], dim=1)


def full_grads(model: nn.Module, ctx: ep.DistContext | None, what: str = "") -> dict[str, torch.Tensor]:
    """Every gradient in the single-device layout (shards gathered, experts over ep), fp32."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        assert p.grad is not None, f"{what} no gradient of {name}"
        grad = full_tensor(p.grad).float().clone()
        if ".experts." in name and ctx is not None and ctx.ep_size > 1:
            parts = [torch.empty_like(grad) for _ in range(ctx.ep_size)]
            dist.all_gather(parts, grad.contiguous(), group=ctx.ep_group)
            grad = torch.cat(parts)
        out[name] = grad
    return out


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, **tol: float) -> None:
    assert got.keys() == want.keys(), (what, sorted(got.keys() ^ want.keys()))
    for key in want:
        torch.testing.assert_close(got[key], want[key], **(tol or TOL),
                                   msg=lambda m, key=key: f"{what} {key}: {m}")


def close_in_norm(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str,
                  bound: float) -> None:
    """Each tensor within ``bound`` of the reference, relative to its norm (low precision)."""
    for key, value in want.items():
        error = float((got[key] - value).norm() / value.norm())
        assert error < bound, f"{what} {key}: relative error {error:.4f} (bound {bound})"


def contexts(ctx: ep.DistContext) -> list[ep.DistContext]:
    """One context per expert-parallel size the world and E allow (1, 2, ...), ``ctx`` among them."""
    sizes = [n for n in range(1, ctx.world_size + 1) if ctx.world_size % n == 0 and E % n == 0]
    return [ctx if n == ctx.ep_size else ep.init_distributed(ep_size=n) for n in sizes]


# ---- fp16 gradients under fully_shard ----
def check_fsdp_fp16(ctx: ep.DistContext) -> None:
    xs, ts = batches(ctx, 1, {})
    ref = build(None).half()
    (token_loss_sum(ref(tokens(xs).half()), tokens(ts)) / tokens(xs).shape[1]).backward()
    want = full_grads(ref, None)
    for c in contexts(ctx):
        for how in ("fp16 model", "param_dtype fp16"):
            model = build(c.ep_group)
            policy = None
            if how == "fp16 model":
                model = model.half()
            else:
                policy = MixedPrecisionPolicy(param_dtype=torch.float16)
            model = ep.fully_shard(model, c, mp_policy=policy)
            y_BLD = model(xs[c.rank].to(next(model.parameters()).dtype))
            rank_loss(y_BLD, ts[c.rank], c).backward()
            close_in_norm(full_grads(model, c), want, f"fully_shard, {how}, ep {c.ep_size} x dp "
                          f"{c.dp_size}: gradient of", 0.01)


# ---- one layer applied twice ----
def check_twice(ctx: ep.DistContext) -> None:
    xs, ts = batches(ctx, 2, {})
    ref = build(None, calls=2)
    (token_loss_sum(ref(tokens(xs)), tokens(ts)) / tokens(xs).shape[1]).backward()
    want = full_grads(ref, None)
    for mode in ("reentrant", "mixed", "nested", "non_reentrant"):
        # static_graph: DDP's own way to take a parameter that reentrant passes use twice
        model = ep.data_parallel(build(ctx.ep_group, calls=2, mode=mode), ctx, static_graph=True)
        for step in range(2):  # a static graph's first iteration is special: check two
            model.zero_grad()
            rank_loss(model(xs[ctx.rank]), ts[ctx.rank], ctx).backward()
            same(full_grads(model, ctx), want, f"data_parallel, layer called twice, {mode}, step {step}:")


# ---- a rank without tokens ----
FORMS = ("plain", "data_parallel", "fully_shard")


def wrap(form: str, ctx: ep.DistContext) -> nn.Module:
    model = build(ctx.ep_group)
    if form == "data_parallel":
        return ep.data_parallel(model, ctx)
    return ep.fully_shard(model, ctx) if form == "fully_shard" else model


def check_empty(ctx: ep.DistContext, steps: int = 2) -> None:
    """Step s leaves rank (s+1) % W empty: [0, L, D] at step 0, [B, 0, D] at step 1."""
    plan = [{(s + 1) % ctx.world_size: (0, L, D) if s % 2 == 0 else (B, 0, D)} for s in range(steps)]
    for c in contexts(ctx):
        for form in FORMS:
            ref, model = build(None), wrap(form, c)
            ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step, empty in enumerate(plan):
                xs, ts = batches(c, 3 + step, empty)
                (token_loss_sum(ref(tokens(xs)), tokens(ts)) / tokens(xs).shape[1]).backward()
                rank_loss(model(xs[c.rank]), ts[c.rank], c).backward()
                if form == "plain":
                    ep.sync_gradients(model, c)
                what = f"{form}, ep {c.ep_size} x dp {c.dp_size}, rank {list(empty)} empty, step {step}:"
                same(full_grads(model, c, what), full_grads(ref, None), f"{what} gradient of")
                for optimizer in (opt, ref_opt):
                    optimizer.step()
                    optimizer.zero_grad()
            evaluate(model, ref, c, plan[0], f"{form}, ep {c.ep_size}, eval:")


def evaluate(model: nn.Module, ref: Net, ctx: ep.DistContext, empty: dict[int, tuple[int, int, int]],
             what: str) -> None:
    """Eval-mode forwards without grad, one rank empty: this rank's rows of the reference's output."""
    xs, _ = batches(ctx, 9, empty)
    model.eval()
    ref.eval()
    with torch.no_grad():
        got = model(xs[ctx.rank])
        want = ref(xs[ctx.rank]) if xs[ctx.rank].numel() else torch.zeros_like(xs[ctx.rank])
    assert got.shape == xs[ctx.rank].shape, (what, got.shape)
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what} {m}")


CHECKS: dict[str, Callable[[ep.DistContext], None]] = {
    "fsdp_fp16": check_fsdp_fp16,
    "twice": check_twice,
    "empty": check_empty,
}


def main() -> int:
    args = check_parser(CHECKS).parse_args()
    ctx = ep.init_distributed(ep_size=args.ep_size, timeout=60)
    return run_checks(CHECKS, args.checks.split(","), ctx)


if __name__ == "__main__":
    sys.exit(main())
