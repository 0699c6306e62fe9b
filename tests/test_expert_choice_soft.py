"""Expert-choice and Soft MoE routing in the same pipeline, against literal oracles."""

from __future__ import annotations

import pytest
import torch

import expert_parallel as ep
from expert_parallel.ops.plan import expert_choice_plan
from tests.helpers import BASE, build, compare_with_oracle
from tests.oracle import oracle_expert_choice_moe, oracle_soft_moe

EC_CASES = {
    "cf1": (dict(capacity_factor=1.0), (2, 8), True),
    "cf_half_drops": (dict(capacity_factor=0.5), (2, 8), True),
    "cf2_eval": (dict(capacity_factor=0.5, eval_capacity_factor=2.0), (2, 8), False),
    "groups_swiglu": (dict(capacity_factor=1.0, group_size=4, activation="swiglu"), (2, 8), True),
    "epg_half_geglu_bias": (dict(capacity_factor=1.5, examples_per_group=0.5, activation="geglu",
                                 bias=True), (2, 8), True),
    "relu_bias": (dict(capacity_factor=1.0, activation="relu", bias=True), (3, 4), True),
    "expert_capacity": (dict(expert_capacity=3), (2, 8), True),
    "router_bias_clamped_swiglu": (dict(capacity_factor=1.0, router_bias=True, activation="clamped_swiglu",
                                        swiglu_limit=0.5, bias=True), (2, 8), True),
    "min_capacity_capped_at_S": (dict(min_capacity=10, group_size=4), (2, 8), True),
}

SOFT_CASES = {
    "one_slot": (dict(slots_per_expert=1), (2, 8), True),
    "two_slots_groups": (dict(slots_per_expert=2, group_size=4), (2, 8), True),
    "three_slots_swiglu_bias": (dict(slots_per_expert=3, activation="swiglu", bias=True), (2, 5), True),
    "geglu_eval_epg": (dict(slots_per_expert=2, activation="geglu", examples_per_group=1), (3, 4),
                       False),
    "relu": (dict(activation="relu"), (1, 6), True),
    "router_bias_clamped_swiglu": (dict(slots_per_expert=2, router_bias=True, activation="clamped_swiglu",
                                        swiglu_limit=0.5), (2, 5), True),
}


@pytest.mark.parametrize("name", list(EC_CASES))
def test_expert_choice_matches_oracle(name: str) -> None:
    overrides, (B, L), training = EC_CASES[name]
    moe = build({"router": "expert_choice", **overrides})
    x = torch.randn(B, L, BASE["d_model"])
    compare_with_oracle(moe, x, training, lambda m, xx: oracle_expert_choice_moe(m, xx, training))


@pytest.mark.parametrize("name", list(SOFT_CASES))
def test_soft_matches_oracle(name: str) -> None:
    overrides, (B, L), training = SOFT_CASES[name]
    moe = build({"router": "soft", **overrides})
    x = torch.randn(B, L, BASE["d_model"])
    compare_with_oracle(moe, x, training, lambda m, xx: oracle_soft_moe(m, xx))


def test_expert_choice_every_expert_takes_exactly_c_distinct_tokens() -> None:
    torch.manual_seed(0)
    router = ep.ExpertChoiceRouter(8, 5, capacity_factor=1.25, min_capacity=1)
    G, S = 3, 16
    out = router(torch.randn(G, S, 8))
    C = 4  # ceil(1.25 * 16 / 5)
    assert out.token_indices.shape == (G, 5, C) and out.weights.shape == (G, 5, C)
    for g in range(G):
        for e in range(5):
            chosen = out.token_indices[g, e]
            assert len(set(chosen.tolist())) == C
            best = out.probs[g, :, e].topk(C).indices
            assert set(chosen.tolist()) == set(best.tolist())
            torch.testing.assert_close(out.weights[g, e], out.probs[g, chosen, e])
    plan = expert_choice_plan(out.token_indices, out.weights, S)
    assert torch.equal(plan.counts_E, torch.full((5,), G * C))


def test_expert_choice_capacity_factor_raises_tokens_per_expert_and_experts_per_token() -> None:
    """Raising the factor fills more slots per expert and so, indirectly, more experts per token."""
    x = torch.randn(2, 16, BASE["d_model"])
    per_expert, per_token, dropped = [], [], []
    for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
        moe = build({"router": "expert_choice", "capacity_factor": factor})
        _, aux = moe(x)
        per_expert.append(aux.expert_counts[0].item())
        per_token.append(aux.expert_counts.sum().item() / x.shape[0] / x.shape[1])
        dropped.append(aux.dropped_fraction.item())
    assert per_expert == sorted(per_expert) and per_expert[0] < per_expert[-1]
    assert per_token == sorted(per_token) and per_token[0] < 1 < per_token[-1]
    assert dropped[0] > dropped[-1]


def test_soft_weights_sum_to_one() -> None:
    torch.manual_seed(1)
    router = ep.SoftRouter(8, 3, slots_per_expert=2)
    out = router(torch.randn(4, 5, 8))
    assert out.dispatch.shape == (4, 5, 6) and out.combine.shape == (4, 5, 6)
    torch.testing.assert_close(out.dispatch.sum(1), torch.ones(4, 6))  # per slot, over tokens
    torch.testing.assert_close(out.combine.sum(2), torch.ones(4, 5))  # per token, over slots
    assert (out.dispatch > 0).all() and (out.combine > 0).all()


def test_soft_state_dict_and_nothing_dropped() -> None:
    moe = build({"router": "soft", "slots_per_expert": 3, "capacity_factor": 0.1})
    assert moe.state_dict()["router.weight"].shape == (BASE["num_experts"] * 3, BASE["d_model"])
    _, aux = moe(torch.randn(2, 4, BASE["d_model"]))
    assert aux.dropped_fraction == 0 and aux.load_balance_loss == 0
    assert torch.equal(aux.expert_counts, torch.full((BASE["num_experts"],), 3))


def test_expert_choice_train_and_eval_capacity() -> None:
    moe = build({"router": "expert_choice", "capacity_factor": 0.5, "eval_capacity_factor": 2.0})
    x = torch.randn(2, 8, BASE["d_model"])
    assert moe.train()(x)[1].expert_counts[0] == 2  # ceil(0.5 * 16 / 4)
    assert moe.eval()(x)[1].expert_counts[0] == 8  # ceil(2.0 * 16 / 4)


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_token_mixing_leaks_future_tokens_with_sequence_groups(router: str) -> None:
    """The documented hazard: with groups spanning positions, a later token changes earlier outputs."""
    moe = build({"router": router, "capacity_factor": 0.5})
    x = torch.randn(2, 8, BASE["d_model"])
    x2 = x.clone()
    x2[:, -1] = 10 * torch.randn(2, BASE["d_model"])
    assert not torch.allclose(moe(x)[0][:, :-1], moe(x2)[0][:, :-1])
    with pytest.raises(ValueError, match="leaks future tokens"):
        ep.check_causal_routing(moe.cfg)


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_per_position_groups_are_causal(router: str) -> None:
    """The documented safe use: position-major tokens, one group per position."""
    B, L, D = 3, 6, BASE["d_model"]
    moe = build({"router": router, "capacity_factor": 1.0, "group_size": B})
    ep.check_causal_routing(moe.cfg, per_position_groups=True)

    def causal_moe(x_BLD: torch.Tensor) -> torch.Tensor:
        y_LBD, _ = moe(x_BLD.transpose(0, 1).contiguous())
        return y_LBD.transpose(0, 1)

    x = torch.randn(B, L, D)
    y = causal_moe(x)
    for t in range(1, L):
        x2 = x.clone()
        x2[:, t:] = torch.randn(B, L - t, D)
        torch.testing.assert_close(causal_moe(x2)[:, :t], y[:, :t], rtol=0, atol=0)


def test_token_choice_is_causal_safe() -> None:
    ep.check_causal_routing(ep.MoEConfig(d_model=8, d_ff=8, num_experts=4))
    ep.check_causal_routing(ep.MoEConfig(d_model=8, d_ff=8, num_experts=4, router="noisy_topk"))
