"""Run under torchrun (2 ranks, gloo): the runtime promises for real jobs, scenario by scenario.

    torchrun --standalone --nproc-per-node 2 tests/workers/runtime.py DIR [SCENARIO ...]

Each scenario prints "OK <scenario>" on every rank (the test counts them):
  health_groups      8 MoE layers on one EP group create one gloo health group (built with the first)
  latest_on_rank0    ranks read different ``latest`` files: both resume from rank 0's
  latest_unreadable  rank 1 cannot see rank 0's checkpoint: FileNotFoundError on both, naming it
  per_rank_seeds     the model built after torch.manual_seed(1000 + rank): ValueError saying how to seed
  unused_grads       a parameter no rank used keeps grad None; one used on rank 0 only gets its grad
  device_discipline  every tensor the library creates during a step names its device
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

import expert_parallel as ep
from expert_parallel.comm import exchange

D = 8
PACKAGE = str(Path(ep.__file__).parent)


def say(scenario: str) -> None:
    print(f"OK {scenario} rank {dist.get_rank()}", flush=True)


def layer(ctx: ep.DistContext, **overrides: Any) -> ep.MoE:
    cfg = ep.MoEConfig(**{**dict(d_model=D, d_ff=8, num_experts=4, top_k=2), **overrides})
    return ep.MoE(cfg, ep_group=ctx.ep_group)


def health_groups(ctx: ep.DistContext, _: Path) -> None:
    made: list[object] = []
    original = dist.new_group

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    exchange._HEALTH_GROUPS.clear()  # as in a fresh process
    dist.new_group = counting  # type: ignore[assignment]
    try:
        torch.manual_seed(0)
        model = nn.ModuleList(layer(ctx, capacity_factor=None) for _ in range(8))
        assert made == ["gloo"], f"building 8 layers created process groups {made}"
        ep.configure_debug(model, check_finite=True, check_splits=True)  # checks that use the group
        for _ in range(2):
            x = torch.randn(2, 4, D)
            for moe in model:
                x = x + moe(x)[0]
            x.sum().backward()
    finally:
        dist.new_group = original  # type: ignore[assignment]
    assert made == ["gloo"], f"expected one gloo health group, got {made}"


def _fake_checkpoint(directory: Path, step: int, latest: bool) -> str:
    name = f"step_{step:08d}"
    (directory / name).mkdir(parents=True, exist_ok=True)
    (directory / name / ".metadata").write_bytes(b"")
    if latest:
        (directory / "latest").write_text(name)
    return name


def latest_on_rank0(ctx: ep.DistContext, tmp: Path) -> None:
    """Rank 1 reads a stale ``latest`` (step 1) while rank 0's names step 2; both exist everywhere."""
    mine = tmp / f"stale_rank{ctx.rank}"
    _fake_checkpoint(mine, 1, latest=ctx.rank == 1)
    _fake_checkpoint(mine, 2, latest=ctx.rank == 0)
    path = ep.latest_checkpoint(mine, ctx)
    assert path is not None and path.name == "step_00000002", path


def latest_unreadable(ctx: ep.DistContext, tmp: Path) -> None:
    """Node-local disks: only rank 0 has the checkpoint; without the broadcast rank 1 would start
    from step 1 while rank 0 entered the collective load (a hang)."""
    mine = tmp / f"local_rank{ctx.rank}"
    mine.mkdir(parents=True, exist_ok=True)
    if ctx.rank == 0:
        _fake_checkpoint(mine, 5, latest=True)
    try:
        ep.latest_checkpoint(mine, ctx)
    except FileNotFoundError as err:
        assert "step_00000005" in str(err) and "ranks [1]" in str(err) and "shared" in str(err), err
        return
    raise AssertionError("no FileNotFoundError")


def per_rank_seeds(ctx: ep.DistContext, _: Path) -> None:
    torch.manual_seed(1000 + ctx.rank)
    try:
        layer(ctx)
    except ValueError as err:
        text = str(err)
        assert "MoE replicated state differs" in text and "router.weight" in text, text
        assert "expert base seed" in text and "torch.manual_seed" in text, text
    else:
        raise AssertionError("per-rank seeds were accepted")
    torch.manual_seed(7)  # the same seed everywhere passes
    layer(ctx)


class WithSpareParts(nn.Module):
    """An MoE, a linear layer that no rank uses and one that only rank 0 uses."""

    def __init__(self, ctx: ep.DistContext | None) -> None:
        super().__init__()
        self.moe = ep.MoE(ep.MoEConfig(d_model=D, d_ff=8, num_experts=4, capacity_factor=None),
                          ep_group=ctx.ep_group if ctx else None)
        self.unused = nn.Linear(D, D)
        self.rank0_only = nn.Linear(D, D)

    def loss(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        y, aux = self.moe(x)
        if rank == 0:
            y = y + self.rank0_only(x)
        return y.square().mean() + aux.loss


def unused_grads(ctx: ep.DistContext, _: Path) -> None:
    torch.manual_seed(0)
    model = WithSpareParts(ctx)
    torch.manual_seed(0)
    ref = WithSpareParts(None)
    xs = [torch.randn(2, 4, D, generator=torch.Generator().manual_seed(r)) for r in range(ctx.world_size)]
    model.loss(xs[ctx.rank], ctx.rank).backward()
    ep.sync_gradients(model, ctx)
    (sum(ref.loss(x, r) for r, x in enumerate(xs)) / ctx.world_size).backward()
    assert model.unused.weight.grad is None and model.unused.bias.grad is None
    for name in ("rank0_only.weight", "rank0_only.bias", "moe.router.weight"):
        got, want = model.get_parameter(name).grad, ref.get_parameter(name).grad
        assert got is not None and want is not None, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    before = model.unused.weight.detach().clone()
    torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1).step()
    assert torch.equal(model.unused.weight, before), "AdamW moved a parameter without gradient"


FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.randn,
             torch.rand, torch.randint, torch.as_tensor, torch.eye, torch.linspace}


class FactoryWatch(TorchFunctionMode):
    """Records every tensor factory called from the library's code without a ``device=``.

    On a GPU such a tensor lands on the CPU: in a collective of an NCCL group it fails, in a
    computation it mixes devices. On this CPU machine the mode finds them all the same.
    """

    def __init__(self, host_side: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.undirected: list[str] = []
        self.host_side = host_side  # functions that make host tensors on purpose (e.g. data sampling)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = inspect.stack()[1]
            if caller.filename.startswith(PACKAGE) and caller.function not in self.host_side:
                self.undirected.append(f"{func.__name__} at {caller.filename}:{caller.lineno}")
        return func(*args, **kwargs)


def device_discipline(ctx: ep.DistContext, _: Path) -> None:
    cases = [dict(capacity_factor=1.0), dict(capacity_factor=None), dict(router="expert_choice"),
             dict(router="soft"), dict(router="noisy_topk")]
    for overrides in cases:
        torch.manual_seed(0)
        moe = layer(ctx, **overrides)
        ep.configure_debug(moe, check_finite=True, check_splits=True)
        x = torch.randn(2, 4, D, requires_grad=True)
        watch = FactoryWatch()
        with watch:
            y, aux = moe(x)
            (y.sum() + aux.loss).backward()
            ep.sync_gradients(moe, ctx)
            ep.clip_grad_norm_(moe, 1.0, ctx)
        assert watch.undirected == [], (overrides, watch.undirected)
        for field in ("loss", "load_balance_loss", "z_loss", "router_entropy", "dropped_fraction",
                      "expert_counts"):
            assert getattr(aux, field).device == x.device, field


SCENARIOS = {f.__name__: f for f in (health_groups, latest_on_rank0, latest_unreadable, per_rank_seeds,
                                     unused_grads, device_discipline)}


def main() -> int:
    tmp = Path(sys.argv[1])
    names = sys.argv[2:] or list(SCENARIOS)
    ctx = ep.init_distributed(backend="gloo", timeout=60)
    for name in names:
        SCENARIOS[name](ctx, tmp)
        say(name)
    ep.shutdown(ctx)  # ends a launched process at once (docs/reliability.md, "Ending a job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
