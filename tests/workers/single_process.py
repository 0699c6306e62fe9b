"""Run as plain `python`: the single-process debug mode, and the all-to-all path at R = 1.

The AllToAllDispatcher over a one-rank group (count all-gather, the autograd all-to-all in
capacity and dropless mode) must give exactly what the LocalDispatcher gives, for every router.
``--backend nccl`` (a GPU): the same over a one-rank NCCL group on the GPU, in fp32 and under bf16
autocast, so a machine with one GPU exercises the exchange on NCCL.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

import expert_parallel as ep
from expert_parallel.comm.exchange import AllToAllDispatcher

CONFIGS = [
    dict(capacity_factor=0.5), dict(capacity_factor=None), dict(capacity_factor=0.75, drop_policy="probs"),
    dict(router="expert_choice", capacity_factor=0.5), dict(router="soft", slots_per_expert=2),
    dict(capacity_factor=1.0, group_size=4, bias=True, activation="swiglu"),
    dict(capacity_factor=1.25, d_model=16, d_ff=32),  # 16-byte bf16 rows: the fused grouped_mm on a GPU
]


def check_launch(backend: str) -> ep.DistContext:
    """No launcher: ep_size=2 is refused, then a world of one on the CPU (gloo) or a GPU (nccl)."""
    if backend == "gloo":
        try:
            ep.init_distributed(ep_size=2)
            raise AssertionError("ep_size=2 in a world of 1 was accepted")
        except ValueError as err:
            assert "ep_size=2" in str(err)
    ctx = ep.init_distributed(backend=None if backend == "gloo" else backend)
    assert (ctx.launcher, ctx.world_size, ctx.rank, ctx.ep_size, ctx.dp_size) == ("none", 1, 0, 1, 1)
    assert ctx.backend == backend and ctx.device.type == ("cpu" if backend == "gloo" else "cuda")
    return ctx


def compare(ctx: ep.DistContext, overrides: dict, autocast: bool) -> None:
    """The local path and the all-to-all path over ctx's one-rank group: output, counts, gradients."""
    cfg = ep.MoEConfig(**{**dict(d_model=8, d_ff=12, num_experts=4, min_capacity=1), **overrides})
    torch.manual_seed(0)
    local = ep.MoE(cfg).to(ctx.device)
    torch.manual_seed(0)
    exchanged = ep.MoE(cfg, ep_group=ctx.ep_group).to(ctx.device)
    exchanged.dispatcher = AllToAllDispatcher(ctx.ep_group, cfg.num_experts)
    x = torch.randn(2, 8, cfg.d_model).to(ctx.device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    cast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with cast:
        ya, aux_a = local(xa)
        yb, aux_b = exchanged(xb)
    torch.testing.assert_close(ya, yb)
    assert torch.equal(aux_a.expert_counts, aux_b.expert_counts)
    ya.float().square().sum().backward()
    yb.float().square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for (name, p), q in zip(local.named_parameters(), exchanged.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert aux_b.comm is not None and aux_b.comm.mode in ("capacity", "dropless")
    print("ok", overrides, "bf16 autocast" if autocast else "", aux_b.comm.mode, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    backend = parser.parse_args().backend
    ctx = check_launch(backend)
    for overrides in CONFIGS:
        compare(ctx, overrides, autocast=False)
        if backend == "nccl":
            compare(ctx, overrides, autocast=True)
    print("ALL OK", flush=True)
    ep.shutdown(ctx)  # without a launcher: destroys the groups and returns
    return 0


if __name__ == "__main__":
    sys.exit(main())
