"""Property-based tests (hypothesis) over random configurations of the single-device layer, and a
random sample of configurations on 2 and 4 gloo ranks (expert-parallel == single device)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import expert_parallel as ep
from tests.oracle import oracle_expert_choice_moe, oracle_soft_moe, oracle_topk_moe

D = 8


@st.composite
def layer_and_input(draw: st.DrawFn) -> tuple[ep.MoEConfig, tuple[int, int], bool]:
    router = draw(st.sampled_from(["topk", "noisy_topk", "expert_choice", "soft"]))
    E = draw(st.integers(1, 8))
    K = draw(st.integers(1, min(E, 4)))
    B, L = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    T = B * L
    dropless = router in ("topk", "noisy_topk") and draw(st.booleans())
    factor = None if dropless else draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0, 3.0]))
    group = draw(st.sampled_from([None, *[s for s in range(1, T + 1) if T % s == 0]]))
    cfg = ep.MoEConfig(
        d_model=D, d_ff=8, num_experts=E, top_k=K, router=router, capacity_factor=factor,
        eval_capacity_factor=factor if factor is not None or dropless else 1.0,
        min_capacity=draw(st.integers(0, 3)), drop_policy=draw(st.sampled_from(["position", "probs"])),
        group_size=group, slots_per_expert=draw(st.integers(1, 3)),
        activation=draw(st.sampled_from(["relu", "gelu", "swiglu", "geglu"])),
        normalize_topk=draw(st.booleans()), bias=draw(st.booleans()))
    training = router != "noisy_topk" and draw(st.booleans())  # noisy: eval, to compare with the oracle
    return cfg, (B, L), training


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_and_input(), st.integers(0, 2**16))
def test_random_configurations(case: tuple[ep.MoEConfig, tuple[int, int], bool], seed: int) -> None:
    cfg, (B, L), training = case
    torch.manual_seed(seed)
    moe = ep.MoE(cfg).train(training)
    x = torch.randn(B, L, D)
    S = cfg.group_size or B * L
    logits = moe.router.logits(x.reshape(-1, S, D))
    plan, aux = moe._route(logits)
    G = B * L // S
    # capacity is never exceeded; slots are numbered 0.. in each (expert, group) block
    per_block = torch.bincount(plan.expert_N * G + plan.group_N, minlength=cfg.num_experts * G)
    if plan.capacity is not None:
        assert per_block.max() <= plan.capacity
        assert (plan.slot_N < plan.capacity).all()
    # gates are non-negative; a token's combine weights sum to <= 1, and to 1 when nothing was dropped
    if plan.soft is None:
        assert (plan.gate_N >= 0).all()
        per_token = torch.zeros(B * L).index_add(0, plan.token_N, plan.gate_N.float())
        assert (per_token <= 1 + 1e-5).all()
        if cfg.token_choice and cfg.normalize_topk:
            whole = torch.bincount(plan.token_N, minlength=B * L) == cfg.top_k
            torch.testing.assert_close(per_token[whole], torch.ones(int(whole.sum())))
    else:
        torch.testing.assert_close(plan.soft.combine_GSJ.sum(-1), torch.ones(G, S))
        slots = plan.soft.dispatch_GSJ.shape[-1]
        torch.testing.assert_close(plan.soft.dispatch_GSJ.sum(1), torch.ones(G, slots))
    # the layer equals the literal oracle: outputs, kept assignments per expert, dropped fraction
    y, aux = moe(x)
    oracles = {"expert_choice": lambda: oracle_expert_choice_moe(moe, x, training),
               "soft": lambda: oracle_soft_moe(moe, x)}
    y_ref, aux_ref = oracles.get(cfg.router, lambda: oracle_topk_moe(moe, x, training))()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(aux.expert_counts, aux_ref["expert_counts"])
    assert math.isclose(aux.dropped_fraction.item(), aux_ref["dropped_fraction"], abs_tol=1e-6)
