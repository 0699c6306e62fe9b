"""torch.compile of MoE layers against eager (itself checked against the single-device reference
elsewhere): every router in one process with fullgraph=True, activation checkpointing inside a
compiled model, and EP 2 (flat) / EP 4 over 2 nodes (hierarchical) through tests/workers/ep_equivalence.py
--compile, which checks the compiled expert-parallel layer against the single-device reference."""

from __future__ import annotations

import copy
import json
import re
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import expert_parallel as ep
from tests.procs import WORKERS, run, torchrun

TOL = dict(rtol=1e-5, atol=1e-6)
DEEPSEEK = dict(score_func="sigmoid", bias_update_rate=0.01, num_expert_groups=4, num_limited_groups=2,
                route_scale=2.5, num_shared_experts=1, shared_expert_gate=True, seq_aux_loss_coef=0.1)
CONFIGS = {
    "topk_capacity_drops": dict(capacity_factor=0.75),
    "topk_dropless": dict(capacity_factor=None, eval_capacity_factor=None),
    "topk_probs_k1": dict(top_k=1, capacity_factor=1.0, drop_policy="probs"),
    "noisy_topk": dict(router="noisy_topk", capacity_factor=1.0),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
    "soft": dict(router="soft", slots_per_expert=2),
    "deepseek_dropless_swiglu": dict(DEEPSEEK, capacity_factor=None, activation="swiglu"),
    "bias_geglu_groups": dict(bias=True, activation="geglu", group_size=8, capacity_factor=1.0),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    torch._inductor.config.fallback_random = True  # compiled noise and jitter draw what eager draws


Grads = dict[str, torch.Tensor]


def step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Grads]:
    """Output, input gradient and parameter gradients of one forward/backward (aux loss included)."""
    torch.manual_seed(3)
    x = x.clone().requires_grad_()
    y, aux = model(x)
    (y.square().mean() + aux.loss).backward()
    assert x.grad is not None
    params = model._orig_mod if hasattr(model, "_orig_mod") else model
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fullgraph_compile_equals_eager_for_every_router(name: str) -> None:
    cfg = ep.MoEConfig(**{**dict(d_model=16, d_ff=32, num_experts=8, top_k=2, min_capacity=1,
                                 load_balance_coef=0.01, z_loss_coef=0.001), **CONFIGS[name]})
    torch.manual_seed(0)
    eager = ep.MoE(cfg)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)  # any graph break raises
    x = torch.randn(2, 16, 16)
    y1, gx1, g1 = step(eager, x)
    y2, gx2, g2 = step(compiled, x)
    torch.testing.assert_close(y2, y1, **TOL)
    torch.testing.assert_close(gx2, gx1, **TOL)
    assert g1.keys() == g2.keys() and g1
    for key in g1:
        torch.testing.assert_close(g2[key], g1[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")
    if getattr(eager.router, "expert_load", None) is not None:  # routing statistics counted once either way
        assert torch.equal(compiled._orig_mod.router.expert_load, eager.router.expert_load)


class _Loss:
    """The summed aux loss, where step() reads ``.loss``."""

    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


class Blocks(torch.nn.Module):
    """Two residual MoE blocks under non-reentrant activation checkpointing."""

    def __init__(self, cfg: ep.MoEConfig) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([ep.MoE(cfg), ep.MoE(cfg)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, _Loss]:
        losses = []
        for block in self.blocks:
            y, aux = checkpoint(block, x, use_reentrant=False)
            x = x + y
            losses.append(aux.loss)
        return x, _Loss(torch.stack(losses).sum())


def test_compile_with_activation_checkpointing_equals_eager() -> None:
    cfg = ep.MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, capacity_factor=None,
                       eval_capacity_factor=None, load_balance_coef=0.01, bias_update_rate=0.01)
    torch.manual_seed(0)
    eager = Blocks(cfg)
    compiled = torch.compile(copy.deepcopy(eager))
    x = torch.randn(2, 8, 16)
    y1, gx1, g1 = step(eager, x)
    y2, gx2, g2 = step(compiled, x)
    torch.testing.assert_close(y2, y1, **TOL)
    torch.testing.assert_close(gx2, gx1, **TOL)
    for key in g1:
        torch.testing.assert_close(g2[key], g1[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")
    for a, b in zip(eager.blocks, compiled._orig_mod.blocks, strict=True):  # the recompute counts nothing
        assert a.router.expert_load.sum() == 2 * 8 * 2  # B·L tokens × K
        assert torch.equal(a.router.expert_load, b.router.expert_load)


# Every router, DeepSeek-V3's routing and a rank whose experts receive nothing (each case compiles
# afresh, ~11 s: the eager EP tests cover the rest of ep_equivalence.py's cases).
CASES = ["topk_k2_capacity_drops", "topk_k2_dropless", "expert_choice", "soft",
         "deepseek_v3_dropless_uneven", "capacity_last_rank_idle"]


@pytest.mark.parametrize("world, ep_size, extra", [
    (2, 2, ["--cases", *CASES]),
    (4, 4, ["--exchange", "hierarchical", "--ranks-per-node", "2", "--cases", *CASES[:3]]),
], ids=["ep2_flat", "ep4_hierarchical_2nodes"])
def test_compiled_expert_parallel_layer_equals_single_device(world: int, ep_size: int,
                                                             extra: list[str]) -> None:
    out = torchrun(world, "ep_equivalence.py", "--ep-size", str(ep_size), "--compile", *extra, timeout=600)
    cases = extra[extra.index("--cases") + 1:]
    assert f"ALL OK {len(cases) + 1} under torchrun" in out, out[-3000:]


@pytest.mark.parametrize("capacity_factor", [1.25, None], ids=["capacity", "dropless"])
def test_no_recompilation_from_call_to_call(capacity_factor: float | None) -> None:
    """Later calls of the same shape, eager calls of the same module between them included, reuse
    the compiled code (a per-call counter read by the compiled code recompiled it every call, then
    fell back to eager once Dynamo's cache was full: 1.58x eager's time in `bench --compile`)."""
    cfg = ep.MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, capacity_factor=capacity_factor,
                       eval_capacity_factor=capacity_factor)
    torch.manual_seed(0)
    moe = ep.MoE(cfg)
    compiled = torch.compile(moe)
    x = torch.randn(2, 8, 16)
    step(compiled, x)
    step(compiled, x)  # dynamic shapes settle on the second call
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(3):
        step(moe, x)
        step(compiled, x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
    assert moe.calls == 3  # eager calls count; compiled ones leave the counter alone


# Graph breaks of one layer's forward (tests/workers/graph_breaks.py); docs/training.md lists them.
GRAPH_BREAKS = {
    "one process/topk_capacity": 0, "one process/topk_dropless": 0, "one process/expert_choice": 0,
    "one process/soft": 0,
    "flat/topk_capacity": 3, "flat/topk_dropless": 3, "flat/expert_choice": 5, "flat/soft": 3,
    "hierarchical/topk_capacity": 3, "hierarchical/topk_dropless": 3, "hierarchical/expert_choice": 5,
}


def test_graph_breaks_per_layer_are_the_documented_ones() -> None:
    """torch._dynamo.explain per router and exchange, one process and EP 2: exactly the table (and
    the docs); fewer is progress, to be written down."""
    out = run([sys.executable, str(WORKERS / "graph_breaks.py")], timeout=300)
    out += torchrun(2, "graph_breaks.py", timeout=300)
    found = {row["case"]: row["breaks"] for row in map(json.loads, re.findall(r'^\{"case".*$', out, re.M))}
    assert found == GRAPH_BREAKS, found
