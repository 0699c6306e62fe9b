"""Run under torchrun (2 ranks, one expert-parallel group): saving leaves the optimizer alone, a
resume replays the random stream, and ``copy.deepcopy`` of a model holding an expert-parallel MoE.

Each check prints ``OK <name>`` or ``FAIL <name>: <error>`` (the others still run); the test reads
the lines. References are independent runs: a run that never saved, an uninterrupted run, the
original model.
"""

from __future__ import annotations

import copy
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import expert_parallel as ep

CFG: dict[str, Any] = dict(d_model=8, d_ff=16, num_experts=4, top_k=2, capacity_factor=None)
STEPS = 3


class Net(nn.Module):
    """A linear layer in front of an expert-parallel MoE (replicated and expert parameters)."""

    def __init__(self, ctx: ep.DistContext, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)  # every rank builds the same replicas
        self.inp = nn.Linear(8, 8)
        self.moe = ep.MoE(ep.MoEConfig(**CFG, dropout=dropout), ep_group=ctx.ep_group)

    def forward(self, x: Tensor) -> Tensor:
        y, aux = self.moe(self.inp(x))
        return (y ** 2).mean() + aux.loss


def batch(ctx: ep.DistContext, step: int) -> Tensor:
    """This rank's batch of a step, from a generator of its own (the global one is left alone)."""
    return torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(100 * step + ctx.rank))


def train(model: Net, opt: torch.optim.Optimizer, ctx: ep.DistContext, steps: range) -> None:
    for step in steps:
        model(batch(ctx, step)).backward()
        ep.sync_gradients(model, ctx)
        opt.step()
        opt.zero_grad()


def same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item():.3g}"


def same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, model_a: nn.Module,
                         model_b: nn.Module) -> None:
    """The same parameters (by name) have state, with equal values (Adam's step counts included)."""
    names_a = {id(p): n for n, p in model_a.named_parameters()}
    names_b = {id(p): n for n, p in model_b.named_parameters()}
    state_a = {names_a[id(p)]: s for p, s in a.state.items()}
    state_b = {names_b[id(p)]: s for p, s in b.state.items()}
    assert sorted(state_a) == sorted(state_b), (sorted(state_a), sorted(state_b))
    for name, entries in state_a.items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[name][key])), (name, key)


def check_save_before_first_step(ctx: ep.DistContext, tmp: Path) -> None:
    """Saving before the first step, then training == training without the save; and the saved
    checkpoint, loaded into a fresh model and optimizer, trains to the same parameters."""
    saved, plain, loaded = Net(ctx), Net(ctx), Net(ctx)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (saved, plain, loaded)]
    path = ep.save_checkpoint(tmp / "before", saved, opts[0], ctx, step=0)
    ep.load_checkpoint(path, loaded, opts[2], ctx)
    for model, opt in zip((saved, plain, loaded), opts, strict=True):
        train(model, opt, ctx, range(STEPS))
    for model, opt in ((saved, opts[0]), (loaded, opts[2])):
        same_params(model, plain)
        same_optimizer_state(opt, opts[1], model, plain)
    steps = {float(s["step"]) for s in opts[0].state.values()}
    assert steps == {STEPS}, f"Adam step counts {steps}, expected {STEPS}"


def frozen_net(ctx: ep.DistContext) -> tuple[Net, torch.optim.Optimizer]:
    """The router and the experts' w_in frozen but in the optimizer (they never get state)."""
    model = Net(ctx)
    model.moe.router.weight.requires_grad_(False)
    model.moe.experts.w_in.requires_grad_(False)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def check_frozen_parameters(ctx: ep.DistContext, tmp: Path) -> None:
    """A save with frozen parameters in the optimizer works and loads back: the same parameters,
    the same optimizer state, and the next steps agree."""
    model, opt = frozen_net(ctx)
    train(model, opt, ctx, range(2))
    path = ep.save_checkpoint(tmp / "frozen", model, opt, ctx, step=2)
    other, other_opt = frozen_net(ctx)
    ep.load_checkpoint(path, other, other_opt, ctx)
    same_params(other, model)
    same_optimizer_state(other_opt, opt, other, model)
    train(model, opt, ctx, range(2, 4))
    train(other, other_opt, ctx, range(2, 4))
    same_params(other, model)


def draws_and_train(model: Net, opt: torch.optim.Optimizer, ctx: ep.DistContext) -> Tensor:
    """After the (re)start: a user's own draw, then steps with dropout (more draws)."""
    drawn = torch.rand(5)
    train(model, opt, ctx, range(2, 4))
    return drawn


def check_resume_random_stream(ctx: ep.DistContext, tmp: Path) -> None:
    """An uninterrupted run against one resumed from its checkpoint: the draws after the resume
    (torch.rand, the layer's dropout) and the parameters after two more steps are the same."""
    torch.manual_seed(1234 + ctx.rank)
    straight = Net(ctx, dropout=0.2)
    straight_opt = torch.optim.Adam(straight.parameters(), lr=1e-2)
    torch.manual_seed(1234 + ctx.rank)
    train(straight, straight_opt, ctx, range(2))
    path = ep.save_checkpoint(tmp / "resume", straight, straight_opt, ctx, step=2)
    drawn = draws_and_train(straight, straight_opt, ctx)
    torch.manual_seed(999)  # a restarted process: another seed, which the load replaces
    resumed = Net(ctx, dropout=0.2)
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    ep.load_checkpoint(path, resumed, resumed_opt, ctx)
    assert torch.equal(draws_and_train(resumed, resumed_opt, ctx), drawn), "torch.rand after the resume"
    same_params(resumed, straight)
    same_optimizer_state(resumed_opt, straight_opt, resumed, straight)


def check_deepcopy(ctx: ep.DistContext, tmp: Path) -> None:
    """The copy shares the process groups, gives the original's outputs and gradients, and its
    parameters are its own."""
    model = Net(ctx)
    clone = copy.deepcopy(model)
    assert clone.moe.ep_group is model.moe.ep_group and clone.moe.dispatcher is model.moe.dispatcher
    x = batch(ctx, 0)
    loss, clone_loss = model(x), clone(x)
    assert torch.equal(loss, clone_loss)
    loss.backward()
    clone_loss.backward()
    for (name, p), q in zip(model.named_parameters(), clone.parameters(), strict=True):
        assert p is not q and p.data_ptr() != q.data_ptr(), name
        assert p.grad is not None and q.grad is not None and torch.equal(p.grad, q.grad), name
    w_in, clone_w_in = model.moe.experts.w_in, clone.moe.experts.w_in
    assert isinstance(w_in, torch.Tensor) and isinstance(clone_w_in, torch.Tensor)
    with torch.no_grad():
        clone_w_in.add_(1.0)
    assert not torch.equal(clone_w_in, w_in)


CHECKS: dict[str, Callable[[ep.DistContext, Path], None]] = {
    "save_before_first_step": check_save_before_first_step,
    "frozen_parameters": check_frozen_parameters,
    "resume_random_stream": check_resume_random_stream,
    "deepcopy": check_deepcopy,
}


def main() -> None:
    ctx = ep.init_distributed()
    tmp = Path(sys.argv[1])
    for name, check in CHECKS.items():
        try:
            check(ctx, tmp)
            print(f"OK {name} rank {ctx.rank}", flush=True)
        except Exception as err:  # every check reports; the test names the one that failed
            print(f"FAIL {name} rank {ctx.rank}: {type(err).__name__}: {err} END", flush=True)
            traceback.print_exc()
    ep.shutdown(ctx)


if __name__ == "__main__":
    main()
