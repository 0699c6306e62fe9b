"""Ranks that do different things (run under torchrun, gloo; 2 or 4 ranks).

    torchrun --standalone --nproc-per-node N tests/workers/uneven.py SCENARIO [SCENARIO ...]

Each scenario prints "OK <scenario>" on every rank (or "OK <scenario>: <error>" where an error is the
expected outcome); a wrong number raises AssertionError. References are single-device layers
(``ep.MoE(cfg)``, every expert local) on the same batch: with routing groups inside a rank, a rank's
outputs depend on its own tokens only, so that is what a lockstep run gives.

Scenarios:
  groups         the library's groups are its own: ep, dp and job groups are not the default group
  user_collective rank 0 runs one eval batch more, then both call dist.all_reduce: rank 0's MoE waits
                 on its own group and ends with a CollectiveError naming ep.join; the user's
                 all_reduce never pairs with it (rank 1 gets the right sum or a timeout, never a
                 wrong number)
  layer_mismatch the ranks call different layers (same shapes): CollectiveError on every rank naming
                 each rank's layer and call
  join_eval      evaluation with rank-dependent batch counts (0 on the last rank), eval mode and
                 no_grad, train mode and no_grad, eval mode with grad, bf16 autocast: outputs equal
                 the single-device reference; the join ends on every rank
  join_refuses   inside ep.join, a training forward is refused on every rank at once; a backward
                 through an eval-mode forward made inside it is refused
  join_edges     inside ep.join: a deepcopy whose weights moved apart is served as itself; a layer built
                 on meta and loaded runs its replica check at the join's entry (the rank with no
                 batch never forwards); a live layer with another expert count elsewhere is no
                 obstacle; a DistributedDataParallel or fully_shard model is refused at entry
  misuse         a layer built without ep_group under ep_size 2 is refused by sync_gradients; experts
                 replaced by another module are still reduced as experts (gradients equal the
                 single-device reference) and full_state_dict refuses them
  join_mixed     two layers called in a data-dependent number of steps per rank (a generation-like
                 loop), the hierarchical exchange where the world is 4
"""

from __future__ import annotations

import copy
import re
import sys
import time

import torch
import torch.distributed as dist

import expert_parallel as ep

TIMEOUT = 6.0  # seconds: the collective timeout of these jobs
D = 8


def build(ctx: ep.DistContext, seed: int = 0, ranks_per_node: int | None = None,
          **overrides: object) -> tuple[ep.MoE, ep.MoE]:
    """(expert-parallel layer, single-device reference with the same weights)."""
    base = dict(d_model=D, d_ff=16, num_experts=4, top_k=2, capacity_factor=1.0)
    cfg = ep.MoEConfig(**{**base, **overrides})
    torch.manual_seed(seed)
    ref = ep.MoE(cfg)
    torch.manual_seed(seed)
    layer = ep.MoE(cfg, ep_group=ctx.ep_group, ranks_per_node=ranks_per_node)
    layer.load_full_state_dict(ref.state_dict())
    return layer, ref


def batches(rank: int, count: int, seed: int = 100) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + rank)
    return [torch.randn(2, 3 + i, D, generator=gen) for i in range(count)]


def expect(kind: type[BaseException], pattern: str, fn) -> str:  # type: ignore[no-untyped-def]
    """Runs ``fn``; it must raise ``kind`` with a message matching ``pattern``. Returns the message
    (printed whole only on a mismatch: long lines of two ranks interleave in the job's output)."""
    try:
        fn()
    except kind as err:
        assert re.search(pattern, str(err), re.S), f"{kind.__name__} without {pattern!r}: {err}"
        return str(err)
    raise AssertionError(f"no {kind.__name__} ({pattern!r}) raised")


def groups(ctx: ep.DistContext) -> None:
    world = dist.group.WORLD
    assert ctx.ep_group is not world and ctx.dp_group is not world and ctx.world_group is not world
    assert dist.get_process_group_ranks(ctx.world_group) == list(range(ctx.world_size))
    print("OK groups", flush=True)


def user_collective(ctx: ep.DistContext) -> None:
    layer, _ = build(ctx)
    layer.eval()
    with torch.no_grad():
        for x in batches(ctx.rank, 2):
            layer(x)
    if ctx.rank == 0:  # a third batch on rank 0 only: it waits for a peer that never comes
        start = time.monotonic()
        expect(ep.CollectiveError, r"MoE call 3, count exchange .*ep\.join", lambda: layer(batches(0, 1)[0]))
        assert time.monotonic() - start < TIMEOUT + 5
        print("OK user_collective", flush=True)
        return
    total = torch.tensor([float(ctx.rank + 1)])
    try:  # the user's metric: pairs with nothing of the library's, so it is right or an error
        dist.all_reduce(total)
    except RuntimeError as err:
        assert re.search("[Tt]imed out", str(err)), err
        print("OK user_collective", flush=True)
        return
    raise AssertionError(f"the user's all_reduce returned {total.item()} while rank 0 was in an MoE call")


def layer_mismatch(ctx: ep.DistContext) -> None:
    first, _ = build(ctx, seed=1)
    second, _ = build(ctx, seed=2)
    ep.configure_debug(torch.nn.ModuleDict({"first": first, "second": second}))
    layer = first if ctx.rank == 0 else second
    expect(ep.CollectiveError, r"ranks are in different MoE calls \(rank 0: layer 'first' \(#\d+\) call 1.*"
           r"rank 1: layer 'second' \(#\d+\) call 1", lambda: layer(batches(ctx.rank, 1)[0]))
    print("OK layer_mismatch", flush=True)


def join_eval(ctx: ep.DistContext) -> None:
    layer, ref = build(ctx, capacity_factor=1.25)
    counts = [3, 1, 2, 0][: ctx.world_size]
    counts[-1] = 0  # the last rank has no batch at all
    modes = [("eval", torch.no_grad), ("train", torch.no_grad), ("eval", torch.enable_grad),
             ("eval-bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))]
    for mode, grad in modes:
        layer.train(mode == "train")
        ref.train(mode == "train")
        with ep.join(layer), grad():
            for x in batches(ctx.rank, counts[ctx.rank]):
                y, _ = layer(x)
                with torch.no_grad():
                    want, _ = ref(x)
                tol = dict(atol=2e-2, rtol=2e-2) if mode.endswith("bf16") else dict(atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(y.detach().float(), want.float(), **tol)  # type: ignore[arg-type]
    # after the join, lockstep calls go on with matching call numbers
    layer.eval()
    with torch.no_grad():
        y, _ = layer(batches(ctx.rank, 1, seed=7)[0])
        torch.testing.assert_close(y, ref(batches(ctx.rank, 1, seed=7)[0])[0])
    print("OK join_eval", flush=True)


def join_refuses(ctx: ep.DistContext) -> None:
    layer, _ = build(ctx)
    x = batches(ctx.rank, 1)[0]
    with ep.join(layer):
        layer.train()
        expect(RuntimeError, "training forward .* inside ep.join", lambda: layer(x))
        layer.eval()
        y, _ = layer(x)  # eval mode with grad enabled: the forward works
    expect(RuntimeError, "backward through a forward that ran inside ep.join", lambda: y.sum().backward())
    print("OK join_refuses", flush=True)


def join_mixed(ctx: ep.DistContext) -> None:
    hierarchical = dict(exchange="hierarchical", ranks_per_node=2) if ctx.world_size == 4 else {}
    blocks = [build(ctx, seed=s, capacity_factor=None, **hierarchical) for s in (3, 4)]  # type: ignore[arg-type]
    model = torch.nn.ModuleList([b[0] for b in blocks])
    model.eval()
    steps = [5, 2, 0, 3][ctx.rank]  # like generate(): each rank stops at its own step
    x = batches(ctx.rank, 1)[0]
    with ep.join(model), torch.no_grad():
        for _ in range(steps):
            for layer, ref in blocks:
                y, _ = layer(x)
                torch.testing.assert_close(y, ref(x)[0], atol=1e-5, rtol=1e-5)
                x = torch.tanh(y + x)
    print("OK join_mixed", flush=True)


class LoopExperts(torch.nn.Module):
    """A user's module in place of ``moe.experts``: this rank's experts as plain parameters, run in
    a loop over the received segments (one per source rank, by local expert inside)."""

    def __init__(self, w_in_eDF: torch.Tensor, w_out_eFD: torch.Tensor) -> None:
        super().__init__()
        self.w_in = torch.nn.Parameter(w_in_eDF.detach().clone())
        self.w_out = torch.nn.Parameter(w_out_eFD.detach().clone())

    def forward(self, x_nD: torch.Tensor, counts_Re: torch.Tensor, counts_host: list[int]) -> torch.Tensor:
        e, outs, start = self.w_in.shape[0], [], 0
        for i, rows in enumerate(counts_host):
            x = x_nD[start:start + rows]
            outs.append(torch.nn.functional.gelu(x @ self.w_in[i % e]) @ self.w_out[i % e])
            start += rows
        return torch.cat(outs)


def misuse(ctx: ep.DistContext) -> None:
    torch.manual_seed(0)
    alone = ep.MoE(ep.MoEConfig(d_model=D, d_ff=16, num_experts=4))
    alone(batches(ctx.rank, 1)[0])[0].sum().backward()
    expect(ValueError, r"splits its experts over no ranks .*ep_group=ctx.ep_group",
           lambda: ep.sync_gradients(alone, ctx))
    layer, ref = build(ctx, capacity_factor=None)
    layer.experts = LoopExperts(layer.experts.w_in, layer.experts.w_out)
    xs = [batches(q, 1)[0] for q in range(ctx.world_size)]
    (layer(xs[ctx.rank])[0].pow(2).sum() / ctx.world_size).backward()
    ep.sync_gradients(layer, ctx)
    sum(ref(x)[0].pow(2).sum() for x in xs).div(ctx.world_size ** 2).backward()
    e = ref.experts.w_in.shape[0] // ctx.ep_size
    first = ctx.ep_rank * e
    torch.testing.assert_close(layer.experts.w_in.grad, ref.experts.w_in.grad[first:first + e])
    torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad)
    expect(ValueError, "experts is a LoopExperts", lambda: layer.full_state_dict())
    print("OK misuse", flush=True)


def join_edges(ctx: ep.DistContext) -> None:
    layer, ref = build(ctx, capacity_factor=None)
    other, _ = build(ctx, seed=5, num_experts=8)  # alive, another width: not the joined model's
    copy_, ref_copy = copy.deepcopy(layer), copy.deepcopy(ref)
    with torch.no_grad():  # the copy moves apart from the original (same change on every rank)
        for model in (copy_, ref_copy):
            model.router.weight.mul_(-1.5)
            model.experts.w_in.mul_(1.5)  # a rank serving the original's experts would differ
    cfg = layer.cfg
    with torch.device("meta"):
        torch.manual_seed(0)
        meta = ep.MoE(cfg, ep_group=ctx.ep_group)
    meta.to_empty(device="cpu")
    meta.load_full_state_dict(ref.state_dict())  # replicas not checked yet: checked at the join
    models = [(copy_, ref_copy), (meta, ref)]
    for model, want in models:
        model.eval()
        want.eval()
        with ep.join(model), torch.no_grad():
            for x in batches(ctx.rank, [2, 0, 1, 3][ctx.rank] if ctx.rank else 2):
                torch.testing.assert_close(model(x)[0], want(x)[0], atol=1e-5, rtol=1e-5)
    assert other.calls == 0
    expect(ValueError, "DistributedDataParallel", lambda: ep.join(ep.data_parallel(
        torch.nn.Sequential(build(ctx, seed=6)[0]), ctx)).__enter__())
    expect(ValueError, "fully_shard", lambda: ep.join(ep.fully_shard(
        torch.nn.Sequential(build(ctx, seed=7)[0]), ctx)).__enter__())
    print("OK join_edges", flush=True)


SCENARIOS = {f.__name__: f for f in (groups, user_collective, layer_mismatch, join_eval, join_refuses,
                                      join_mixed, misuse, join_edges)}


def main() -> int:
    ctx = ep.init_distributed(timeout=TIMEOUT)
    for scenario in sys.argv[1:]:
        SCENARIOS[scenario](ctx)
        if scenario == "user_collective":  # the job's groups are out of step now: end it here
            break
    ep.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
