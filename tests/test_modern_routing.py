"""Modern routing: sigmoid scores, aux-loss-free bias, group-limited routing, route scale, shared
experts, the sequence-wise balance loss and MaxVio, each against the loop oracle (tests/oracle.py)."""

from __future__ import annotations

import pytest
import torch

import expert_parallel as ep
from tests import helpers
from tests.helpers import compare_with_oracle
from tests.oracle import oracle_expert_choice_moe, oracle_soft_moe, oracle_topk_moe

BASE = {**helpers.BASE, "num_experts": 8}
DEEPSEEK = dict(score_func="sigmoid", bias_update_rate=1e-3, num_expert_groups=4, num_limited_groups=2,
                route_scale=2.5, num_shared_experts=1, seq_aux_loss_coef=1e-2)

CASES = {
    "sigmoid": dict(score_func="sigmoid", capacity_factor=None),
    "sigmoid_unnormalized_drops": dict(score_func="sigmoid", normalize_topk=False, capacity_factor=0.5),
    "sigmoid_probs_drops": dict(score_func="sigmoid", capacity_factor=0.5, drop_policy="probs"),
    "bias_softmax": dict(bias_update_rate=0.1, capacity_factor=0.75),
    "groups": dict(num_expert_groups=4, num_limited_groups=1, capacity_factor=None),
    "groups_of_one": dict(num_expert_groups=8, num_limited_groups=3, top_k=3, capacity_factor=1.0),
    "route_scale": dict(route_scale=2.5, capacity_factor=0.75),
    "shared": dict(num_shared_experts=2, capacity_factor=0.75, activation="swiglu"),
    "shared_gate_width_bias": dict(num_shared_experts=1, shared_d_ff=20, shared_expert_gate=True, bias=True,
                                   capacity_factor=None),
    "seq_aux": dict(seq_aux_loss_coef=0.1, capacity_factor=0.75),
    "deepseek_v3_dropless": dict(DEEPSEEK, capacity_factor=None),
    "deepseek_v3_capacity": dict(DEEPSEEK, capacity_factor=0.75, activation="swiglu"),
    "deepseek_v3_groups_of_sequences": dict(DEEPSEEK, capacity_factor=1.0, group_size=6),
    "router_bias": dict(router_bias=True, capacity_factor=0.75),
    "router_bias_sigmoid_groups": dict(router_bias=True, score_func="sigmoid", num_expert_groups=4,
                                       num_limited_groups=2, capacity_factor=None),
    "clamped_swiglu": dict(activation="clamped_swiglu", swiglu_alpha=1.5, swiglu_limit=0.5,
                           capacity_factor=0.75),
    "clamped_swiglu_shared": dict(activation="clamped_swiglu", num_shared_experts=1, bias=True,
                                  swiglu_alpha=1.2, swiglu_limit=0.4, capacity_factor=None),
    "gpt_oss": dict(router_bias=True, activation="clamped_swiglu", bias=True, swiglu_limit=0.5,
                    capacity_factor=None),
}


def build(overrides: dict, seed: int = 0) -> ep.MoE:
    """tests.helpers.build with this file's 8 experts."""
    return helpers.build({**BASE, **overrides}, seed)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_matches_oracle(name: str, training: bool) -> None:
    moe = build(CASES[name])
    x = torch.randn(3, 4, BASE["d_model"])
    compare_with_oracle(moe, x, training, lambda m, xx: oracle_topk_moe(m, xx, training))


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_shared_experts_with_token_mixing_routers(router: str) -> None:
    moe = build(dict(router=router, num_shared_experts=1, shared_expert_gate=True, capacity_factor=1.0))
    x = torch.randn(2, 4, BASE["d_model"])
    oracle = oracle_soft_moe if router == "soft" else (lambda m, xx: oracle_expert_choice_moe(m, xx, True))
    compare_with_oracle(moe, x, True, oracle)


def test_the_cases_exercise_what_they_name() -> None:
    """Bias, groups and scale change the routing or the output (else those cases would test nothing)."""
    x = torch.randn(3, 4, BASE["d_model"])
    plain = build(dict(score_func="sigmoid", capacity_factor=None))
    for extra in (dict(bias_update_rate=0.1), dict(num_expert_groups=4, num_limited_groups=1),
                  dict(route_scale=2.5), dict(num_shared_experts=1)):
        other = build(dict(score_func="sigmoid", capacity_factor=None, **extra))
        other.load_state_dict(plain.state_dict(), strict=False)
        if other.router.expert_bias is not None:
            other.router.expert_bias.copy_(torch.randn(8) * 0.3)
        assert not torch.allclose(other(x)[0], plain(x)[0]), extra


def test_router_bias_and_the_clamp_change_the_output() -> None:
    """gpt-oss's router bias moves the routing, and its clamp bites at the limit used above (else the
    cases with them would test nothing); the bias is a trained replicated parameter, zero at first."""
    x = torch.randn(3, 4, BASE["d_model"])
    plain = build(dict(capacity_factor=None))
    biased = build(dict(capacity_factor=None, router_bias=True))
    biased.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        biased.router.bias.zero_()
        assert torch.equal(biased(x)[0], plain(x)[0])
        biased.router.bias.copy_(torch.randn(8))
        assert not torch.equal(biased.router(x).indices, plain.router(x).indices)
    assert "router.bias" in biased.state_dict() and biased.router.bias.requires_grad
    clamped = build(dict(activation="clamped_swiglu", swiglu_limit=0.5, capacity_factor=None))
    loose = build(dict(activation="clamped_swiglu", swiglu_limit=100.0, capacity_factor=None))
    assert not torch.allclose(clamped(x)[0], loose(x)[0])


def test_group_limited_routing_reaches_at_most_m_groups() -> None:
    moe = build(dict(num_expert_groups=4, num_limited_groups=2, top_k=4, capacity_factor=None))
    _, idx, _ = moe.router(torch.randn(64, BASE["d_model"]))
    groups_per_token = [len(set((row // 2).tolist())) for row in idx]
    assert max(groups_per_token) <= 2 and min(groups_per_token) >= 2  # 4 experts from 2 groups of 2


def test_sigmoid_router_output() -> None:
    moe = build(dict(score_func="sigmoid", route_scale=2.0, capacity_factor=None))
    logits = moe.router.logits(torch.randn(5, BASE["d_model"]))
    gates, idx, probs = moe.router.route(logits)
    scores = torch.sigmoid(logits)
    torch.testing.assert_close(probs, scores / scores.sum(-1, keepdim=True))
    torch.testing.assert_close(gates.sum(-1), torch.full((5,), 2.0))  # normalised, then scaled
    assert torch.equal(idx, torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :2])


def test_bias_counts_only_training_forwards() -> None:
    moe = build(dict(bias_update_rate=0.1, capacity_factor=0.5))
    x = torch.randn(2, 4, BASE["d_model"])
    moe.eval()(x)
    assert moe.router.expert_load is not None and moe.router.expert_load.sum() == 0
    _, aux = moe.train()(x)
    # selected assignments, before the capacity drops: every token's K choices
    assert moe.router.expert_load.sum() == 2 * 4 * 2 and aux.dropped_fraction > 0
    with torch.no_grad():  # a training-mode forward without grad (a reentrant checkpoint's) counts
        moe.train()(x)
    assert moe.router.expert_load.sum() == 2 * (2 * 4 * 2)


def test_update_expert_bias_follows_the_sign_rule() -> None:
    moe = build(dict(bias_update_rate=0.01, capacity_factor=None))
    before = moe.router.expert_bias.clone()
    x = torch.randn(4, 8, BASE["d_model"])
    _, aux = moe(x)
    load = moe.router.expert_load.clone().double()
    assert torch.equal(moe.router.expert_load, aux.expert_counts)  # dropless: selected = kept
    ep.update_expert_bias(moe)
    expected = before + (0.01 * torch.sign(load.mean() - load)).float()
    torch.testing.assert_close(moe.router.expert_bias, expected, rtol=0, atol=0)
    assert moe.router.expert_load.sum() == 0


def test_expert_bias_stays_float32_and_is_in_the_state_dict() -> None:
    moe = build(dict(bias_update_rate=0.01, num_shared_experts=1, shared_expert_gate=True))
    moe.router.expert_bias.fill_(1 / 3)
    moe.to(torch.bfloat16)
    third = torch.tensor(1 / 3).item()  # in fp32; bf16 would round it to 0.333984375
    assert moe.router.expert_bias.dtype == torch.float32 and moe.router.expert_bias[0].item() == third
    assert moe.experts.w_in.dtype == torch.bfloat16
    keys = set(moe.state_dict())
    assert {"router.expert_bias", "shared_experts.w_in", "shared_experts.w_out", "shared_gate.weight"} <= keys
    assert "router.expert_load" not in keys and moe.shared_gate.weight.shape == (1, BASE["d_model"])


def test_training_with_the_bias_balances_the_load() -> None:
    """Aux-loss-free balancing works: a router that sends most tokens to two experts (a constant
    feature they reward) spreads its load once the bias has moved, with no aux loss at all."""
    moe = build(dict(score_func="sigmoid", bias_update_rate=0.01, capacity_factor=None,
                     load_balance_coef=0.0, z_loss_coef=0.0))
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
        moe.router.weight[:2, 0] += 1.0
        moe.router.expert_bias.zero_()
    g = torch.Generator().manual_seed(1)
    violations = []
    for _ in range(80):
        x = torch.randn(16, 16, BASE["d_model"], generator=g)
        x[..., 0] = 2.0
        _, aux = moe(x)
        violations.append(aux.max_violation.item())
        ep.update_expert_bias(moe)
    late = sum(violations[-10:]) / 10
    assert violations[0] > 1.5 and late < 0.25 * violations[0], violations
    assert moe.router.expert_bias[:2].mean() < moe.router.expert_bias[2:].mean()  # the favoured pay


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(score_func="tanh"), "score_func"),
    (dict(router="expert_choice", score_func="sigmoid"), "score_func"),
    (dict(route_scale=0.0), "route_scale"),
    (dict(bias_update_rate=-1.0), "bias_update_rate"),
    (dict(router="soft", bias_update_rate=0.1), "bias_update_rate"),
    (dict(num_expert_groups=3, num_limited_groups=1), "num_expert_groups"),
    (dict(num_expert_groups=4), "num_limited_groups"),
    (dict(num_limited_groups=2), "num_expert_groups"),
    (dict(num_expert_groups=4, num_limited_groups=5), "num_limited_groups"),
    (dict(num_expert_groups=8, num_limited_groups=1), "num_limited_groups"),  # 1 expert < top_k 2
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(shared_d_ff=16), "shared_d_ff"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
    (dict(num_shared_experts=1, shared_d_ff=0), "shared_d_ff"),
    (dict(seq_aux_loss_coef=-0.1), "seq_aux_loss_coef"),
    (dict(router="expert_choice", seq_aux_loss_coef=0.1), "seq_aux_loss_coef"),
    (dict(router_bias=1), "router_bias"),
    (dict(activation="clamped_swiglu", swiglu_alpha=0.0), "swiglu_alpha"),
    (dict(activation="clamped_swiglu", swiglu_limit=float("inf")), "swiglu_limit"),
    (dict(activation="clamped_swiglu", swiglu_limit="7"), "swiglu_limit"),
    (dict(activation="swiglu", swiglu_limit=3.0), "swiglu_limit"),  # another activation ignores it
])
def test_bad_values_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"MoEConfig.{field}="):
        ep.MoEConfig(**{**BASE, **overrides})
