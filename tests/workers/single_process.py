"""Run as plain `python`: the single-process debug mode, and the all-to-all path at R = 1.

The AllToAllDispatcher over a one-rank group (count all-gather, the autograd all-to-all in
capacity and dropless mode) must give exactly what the LocalDispatcher gives, for every router.
"""

from __future__ import annotations

import sys

import torch

import expert_parallel as ep
from expert_parallel.comm.exchange import AllToAllDispatcher

CONFIGS = [
    dict(capacity_factor=0.5), dict(capacity_factor=None), dict(capacity_factor=0.75, drop_policy="probs"),
    dict(router="expert_choice", capacity_factor=0.5), dict(router="soft", slots_per_expert=2),
    dict(capacity_factor=1.0, group_size=4, bias=True, activation="swiglu"),
]


def main() -> int:
    try:
        ep.init_distributed(ep_size=2)
        raise AssertionError("ep_size=2 in a world of 1 was accepted")
    except ValueError as err:
        assert "ep_size=2" in str(err)
    ctx = ep.init_distributed()
    assert (ctx.launcher, ctx.world_size, ctx.rank, ctx.ep_size, ctx.dp_size) == ("none", 1, 0, 1, 1)
    assert ctx.device == torch.device("cpu") and ctx.backend == "gloo"
    for overrides in CONFIGS:
        cfg = ep.MoEConfig(**{**dict(d_model=8, d_ff=12, num_experts=4, min_capacity=1), **overrides})
        torch.manual_seed(0)
        local = ep.MoE(cfg)
        torch.manual_seed(0)
        exchanged = ep.MoE(cfg, ep_group=ctx.ep_group)
        exchanged.dispatcher = AllToAllDispatcher(ctx.ep_group, cfg.num_experts)
        x = torch.randn(2, 8, 8)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, aux_a = local(xa)
        yb, aux_b = exchanged(xb)
        torch.testing.assert_close(ya, yb)
        assert torch.equal(aux_a.expert_counts, aux_b.expert_counts)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
        for (name, p), q in zip(local.named_parameters(), exchanged.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        assert aux_b.comm is not None and aux_b.comm.mode in ("capacity", "dropless")
        print("ok", overrides, aux_b.comm.mode, flush=True)
    print("ALL OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
