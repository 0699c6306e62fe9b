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
        normalize_topk=draw(st.booleans()), bias=draw(st.booleans()),
        num_shared_experts=draw(st.integers(0, 2)), **draw(modern_routing(router, E, K)))
    if cfg.num_shared_experts:
        cfg = cfg.replace(shared_expert_gate=draw(st.booleans()))
    training = router != "noisy_topk" and draw(st.booleans())  # noisy: eval, to compare with the oracle
    return cfg, (B, L), training


@st.composite
def modern_routing(draw: st.DrawFn, router: str, E: int, K: int) -> dict:
    """Score function, route scale, expert bias, expert groups, sequence loss (token choice only)."""
    if router not in ("topk", "noisy_topk"):
        return {}
    fields = dict(score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
                  route_scale=draw(st.sampled_from([1.0, 2.5])),
                  bias_update_rate=draw(st.sampled_from([None, 0.01])),
                  seq_aux_loss_coef=draw(st.sampled_from([0.0, 0.1])))
    groups = [(G, M) for G in range(1, E + 1) if E % G == 0 for M in range(1, G + 1) if K <= M * (E // G)]
    if draw(st.booleans()):
        fields["num_expert_groups"], fields["num_limited_groups"] = draw(st.sampled_from(groups))
    return fields


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_and_input(), st.integers(0, 2**16))
def test_random_configurations(case: tuple[ep.MoEConfig, tuple[int, int], bool], seed: int) -> None:
    cfg, (B, L), training = case
    torch.manual_seed(seed)
    moe = ep.MoE(cfg).train(training)
    if cfg.bias_update_rate is not None:
        with torch.no_grad():
            moe.router.expert_bias.normal_(0, 0.1)
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
    # gates are non-negative; a token's combine weights sum to <= route_scale (<= K · route_scale for
    # unnormalised sigmoid gates), and to route_scale when normalised and nothing was dropped
    if plan.soft is None:
        assert (plan.gate_N >= 0).all()
        per_token = torch.zeros(B * L).index_add(0, plan.token_N, plan.gate_N.float())
        most = cfg.route_scale * (cfg.top_k if cfg.score_func == "sigmoid" and not cfg.normalize_topk else 1)
        assert (per_token <= most + 1e-5).all()
        if cfg.token_choice and cfg.normalize_topk:
            whole = torch.bincount(plan.token_N, minlength=B * L) == cfg.top_k
            torch.testing.assert_close(per_token[whole], torch.full((int(whole.sum()),), cfg.route_scale))
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
    for field in ("dropped_fraction", "seq_balance_loss", "max_violation", "loss"):
        got, want = getattr(aux, field).detach().item(), float(torch.as_tensor(aux_ref[field]).detach())
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), (field, got, want)
