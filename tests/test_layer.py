"""MoE (single device) against the plain oracle: outputs, every MoEAux field, all gradients."""

from __future__ import annotations

import pytest
import torch

import expert_parallel as ep
from tests.helpers import BASE, build, check_low_precision, compare_with_oracle
from tests.oracle import oracle_topk_moe

CASES = {
    # name: (config overrides, (B, L), training)
    "switch_k1_drops": (dict(top_k=1, capacity_factor=0.5), (2, 8), True),
    "k2_position_drops": (dict(capacity_factor=0.75), (2, 8), True),
    "k2_probs_drops": (dict(capacity_factor=0.75, drop_policy="probs"), (2, 8), True),
    "k3_drops": (dict(top_k=3, capacity_factor=0.5, num_experts=5), (1, 10), True),
    "k2_dropless": (dict(capacity_factor=None), (2, 8), True),
    "k1_dropless_relu": (dict(top_k=1, capacity_factor=None, activation="relu"), (3, 4), True),
    "swiglu_groups": (dict(activation="swiglu", group_size=4, capacity_factor=1.0), (2, 8), True),
    "geglu_bias": (dict(activation="geglu", bias=True, capacity_factor=1.0), (2, 6), True),
    "relu_bias_probs": (dict(activation="relu", bias=True, drop_policy="probs",
                             capacity_factor=0.5), (2, 6), True),
    "examples_per_group_half": (dict(examples_per_group=0.5, capacity_factor=0.6), (2, 8), True),
    "examples_per_group_two": (dict(examples_per_group=2, capacity_factor=0.6), (4, 3), True),
    "eval_capacity": (dict(capacity_factor=0.5, eval_capacity_factor=1.0), (2, 8), False),
    "eval_dropless": (dict(capacity_factor=0.5, eval_capacity_factor=None), (2, 8), False),
    "expert_capacity": (dict(expert_capacity=2, top_k=1), (2, 8), True),
    "min_capacity": (dict(capacity_factor=0.1, min_capacity=3), (2, 8), True),
    "unnormalized": (dict(normalize_topk=False, capacity_factor=0.75), (2, 8), True),
    "noisy_eval": (dict(router="noisy_topk", capacity_factor=0.75), (2, 8), False),
    "k4_eq_E": (dict(top_k=4, capacity_factor=None), (1, 5), True),
}


def assert_matches_oracle(moe: ep.MoE, x: torch.Tensor, training: bool, **oracle_kwargs) -> None:
    compare_with_oracle(moe, x, training,
                        lambda m, xx: oracle_topk_moe(m, xx, training, **oracle_kwargs))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_oracle(name: str) -> None:
    overrides, (B, L), training = CASES[name]
    moe = build(overrides)
    x = torch.randn(B, L, BASE["d_model"])
    assert_matches_oracle(moe, x, training)


@pytest.mark.parametrize("name", ["k2_position_drops", "geglu_bias", "swiglu_groups"])
def test_undefined_dropped_rows_reach_no_output_or_gradient(name: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One process pads a capacity plan (no host read sizes the kept rows): the grouped GEMM skips the
    dropped rows past its last offset and leaves their outputs and input gradients undefined. Made
    NaN here, they still reach nothing: the output and every gradient equal the oracle's."""
    from expert_parallel.ops import experts as experts_module

    original, poisoned = experts_module.grouped_mm, []

    def nan_past_the_offsets(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        y = original(x, w, offs)
        if w.dim() == 3 and int(offs[-1]) < y.shape[0]:
            y[int(offs[-1]):] = float("nan")
            poisoned.append(y.shape)
        return y

    monkeypatch.setattr(experts_module, "grouped_mm", nan_past_the_offsets)
    overrides, (B, L), training = CASES[name]
    x = torch.randn(B, L, BASE["d_model"])
    assert_matches_oracle(build(overrides), x, training)
    assert len(poisoned) >= 4, poisoned  # the padded path ran with dropped rows, forward and backward
    # Anomaly detection would flag those NaNs in the backward: under it the plan is cut instead.
    poisoned.clear()
    with torch.autograd.detect_anomaly():
        assert_matches_oracle(build(overrides), x, training)
    assert not poisoned, poisoned


def test_cases_exercise_drops() -> None:
    """The drop cases above really drop something (else they would test nothing)."""
    for name in ("switch_k1_drops", "k2_position_drops", "k2_probs_drops", "k3_drops"):
        overrides, (B, L), training = CASES[name]
        moe = build(overrides).train(training)
        _, aux = moe(torch.randn(B, L, BASE["d_model"]))
        assert 0 < aux.dropped_fraction < 1, name


def test_drop_policies_differ() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 8, BASE["d_model"])
    ys = [build(dict(capacity_factor=0.5, drop_policy=p))(x)[0] for p in ("position", "probs")]
    assert not torch.allclose(ys[0], ys[1])


@pytest.mark.parametrize("router_bias", [False, True])
def test_noisy_topk_training_matches_oracle_with_same_noise(router_bias: bool) -> None:
    moe = build(dict(router="noisy_topk", capacity_factor=0.75, router_jitter=0.1, router_bias=router_bias))
    with torch.no_grad():
        moe.router.noise.weight.normal_()
    x = torch.randn(2, 8, BASE["d_model"])
    torch.manual_seed(123)
    jitter = torch.empty(1, 16, BASE["d_model"]).uniform_(0.9, 1.1)
    noise = torch.randn(1, 16, BASE["num_experts"])
    torch.manual_seed(123)  # the layer draws jitter, then noise, in this order
    assert_matches_oracle(moe, x, True, noise_GSE=noise, jitter_GSD=jitter)


def test_noisy_topk_eval_is_deterministic_and_training_is_not() -> None:
    moe = build(dict(router="noisy_topk", capacity_factor=None))
    x = torch.randn(4, 8, BASE["d_model"])
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])
    moe.train()
    assert not torch.equal(moe(x)[0], moe(x)[0])


def test_jitter_only_in_training() -> None:
    moe = build(dict(router_jitter=0.3, capacity_factor=None))
    x = torch.randn(2, 8, BASE["d_model"])
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])
    moe.train()
    assert not torch.equal(moe(x)[0], moe(x)[0])


def test_dropout_on_output_in_training_only() -> None:
    moe = build(dict(dropout=0.5, capacity_factor=None))
    x = torch.randn(4, 8, BASE["d_model"])
    moe.train()
    y, _ = moe(x)
    zero_fraction = (y == 0).float().mean().item()
    assert 0.3 < zero_fraction < 0.7
    moe.eval()
    assert (moe(x)[0] != 0).all()


def test_train_and_eval_capacity_differ() -> None:
    moe = build(dict(capacity_factor=0.5, eval_capacity_factor=2.0))
    x = torch.randn(2, 8, BASE["d_model"])
    assert moe.train()(x)[1].dropped_fraction > 0
    assert moe.eval()(x)[1].dropped_fraction == 0


@pytest.mark.parametrize("overrides", [dict(capacity_factor=None), dict(capacity_factor=1.0),
                                       dict(router="expert_choice"), dict(router="soft")])
def test_bfloat16_routes_exactly_like_float32_and_matches_at_bf16_resolution(overrides: dict) -> None:
    moe = build(dict(dtype="bfloat16", **overrides))
    x = torch.randn(2, 8, BASE["d_model"], dtype=torch.bfloat16)
    ref = build(overrides)
    ref.load_state_dict({k: v.float() for k, v in moe.state_dict().items()})
    y, aux, _, _ = check_low_precision(moe, ref, x)
    assert y.shape == x.shape and aux.z_loss.dtype == torch.float32


def same_layer_twice(cfg: dict) -> tuple[ep.MoE, ep.MoE]:
    """Two fp32 layers with equal weights: one to run under autocast, one as the fp32 reference."""
    torch.manual_seed(0)
    moe = ep.MoE(ep.MoEConfig(**cfg))
    ref = ep.MoE(ep.MoEConfig(**cfg))
    ref.load_state_dict(moe.state_dict())
    return moe, ref


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_fp32_master_weights_under_bf16_autocast(activation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autocast: routing and gates in fp32 (decisions equal to the fp32 layer's), expert GEMMs in
    bf16 through grouped_mm, output and master-weight gradients in fp32 at bf16 resolution."""
    from expert_parallel.ops import experts as experts_module
    if not experts_module.grouped_mm_works(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this torch has no CPU grouped_mm (torch >= 2.10)")
    calls = []
    original = experts_module._CPUGroupedMM.apply
    monkeypatch.setattr(experts_module._CPUGroupedMM, "apply",
                        lambda *a: calls.append(a[0].dtype) or original(*a))
    cfg = dict(d_model=16, d_ff=32, num_experts=4, capacity_factor=None, activation=activation)
    moe, ref = same_layer_twice(cfg)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux, y_ref, aux_ref = check_low_precision(moe, ref, x, autocast=True)
        (y.square().sum() + aux.loss).backward()
    gemms = 3 if activation == "swiglu" else 2  # the autocast layer's; the fp32 reference adds fp32 ones
    assert y.dtype == torch.float32 and calls.count(torch.bfloat16) == gemms, calls
    (y_ref.square().sum() + aux_ref.loss).backward()
    for (name, p), q in zip(moe.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        bound = 8 * torch.finfo(torch.bfloat16).eps * q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=bound, msg=name)


def test_balanced_load_balance_loss_is_one() -> None:
    moe = build(dict(capacity_factor=None))
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities
    _, aux = moe(torch.randn(2, 8, BASE["d_model"]))
    # every expert P_e = 1/E; f sums to 1 over experts, so E * sum f_e / E = 1 exactly
    torch.testing.assert_close(aux.load_balance_loss, torch.tensor(1.0))


@pytest.mark.parametrize("shape", [(2, 8), (8,), (2, 8, 5), (1, 2, 8, 8)])
def test_bad_input_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="d_model"):
        build({})(torch.randn(*shape))


def test_bad_input_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        build({})(torch.randn(2, 8, BASE["d_model"], dtype=torch.float64))


@pytest.mark.parametrize("overrides, B, L, field", [
    (dict(group_size=5), 2, 8, "group_size"),
    (dict(examples_per_group=0.3), 2, 8, "examples_per_group"),
    (dict(examples_per_group=3), 2, 8, "examples_per_group"),
])
def test_groups_that_do_not_divide(overrides: dict, B: int, L: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build(overrides)(torch.randn(B, L, BASE["d_model"]))


def test_bad_input_device() -> None:
    """An input on another device than the parameters is a ValueError (meta stands in for a GPU)."""
    with pytest.raises(ValueError, match="parameters are on cpu"):
        build({})(torch.randn(2, 8, BASE["d_model"], device="meta"))


def test_ties_are_broken_deterministically() -> None:
    """Equal probabilities: top-k takes the lower expert id, expert choice the earlier token (found by
    the property tests; torch.topk leaves tie order unspecified)."""
    from tests.oracle import oracle_expert_choice_moe

    moe = build(dict(top_k=2, capacity_factor=0.5))
    with torch.no_grad():
        moe.router.weight.zero_()  # every probability is 1/E
    x = torch.randn(2, 8, BASE["d_model"])
    assert_matches_oracle(moe, x, True)
    ec = build(dict(router="expert_choice", num_experts=1, top_k=1, capacity_factor=0.25, min_capacity=0))
    x = torch.randn(1, 4, BASE["d_model"])  # one expert: every probability is exactly 1
    torch.testing.assert_close(ec(x)[0], oracle_expert_choice_moe(ec, x, True)[0])


@pytest.mark.parametrize("router", ["soft", "expert_choice"])
def test_autocast_keeps_mixing_and_combine_weights_in_fp32(router: str) -> None:
    """Soft MoE's slot mix and combine (einsums that autocast would run in bf16) stay fp32: the
    routing equals fp32's and the outputs sit within bf16 resolution."""
    from expert_parallel.ops.dispatch import combine_rows
    cfg = dict(d_model=16, d_ff=32, num_experts=4, router=router, capacity_factor=1.0)
    moe, ref = same_layer_twice(cfg)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_low_precision(moe, ref, x, autocast=True)
        plan, _ = moe._route(moe.router.logits(x.reshape(1, -1, 16)))
        rows = torch.randn(plan.num_kept, 16, dtype=torch.bfloat16)
        assert combine_rows(rows, plan, 16).dtype == torch.float32
