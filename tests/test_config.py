"""MoEConfig validation: every field's bad values raise ValueError naming the field."""

from __future__ import annotations

import pytest
import torch

import expert_parallel as ep

GOOD = dict(d_model=8, d_ff=16, num_experts=4)

BAD = [
    ("d_model", 0), ("d_model", -3), ("d_model", 2.5), ("d_model", True), ("d_model", "8"),
    ("d_ff", 0), ("d_ff", None),
    ("num_experts", 0), ("num_experts", 1.0),
    ("top_k", 0), ("top_k", 5), ("top_k", 1.5),
    ("router", "switch"), ("router", None),
    ("capacity_factor", 0), ("capacity_factor", -1.0), ("capacity_factor", float("nan")),
    ("capacity_factor", "1.25"), ("capacity_factor", float("inf")),
    ("eval_capacity_factor", 0.0), ("eval_capacity_factor", True),
    ("expert_capacity", 0), ("expert_capacity", 2.0),
    ("min_capacity", -1), ("min_capacity", 1.5),
    ("drop_policy", "random"),
    ("group_size", 0), ("group_size", 3.0),
    ("examples_per_group", 0), ("examples_per_group", -0.5), ("examples_per_group", "1"),
    ("slots_per_expert", 0),
    ("activation", "tanh"), ("activation", "GELU"),
    ("normalize_topk", 1), ("bias", "yes"),
    ("router_jitter", -0.1), ("router_jitter", 1.0),
    ("dropout", 1.0), ("dropout", -0.2), ("dropout", None),
    ("load_balance_coef", -1e-3), ("z_loss_coef", float("nan")),
    ("dtype", "int32"), ("dtype", torch.int64), ("router_dtype", "fp8"),
    ("exchange", "tree"), ("exchange", None),
]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_value_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}=.*expected"):
        ep.MoEConfig(**{**GOOD, field: value})


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_dropless_only_for_token_choice(router: str) -> None:
    with pytest.raises(ValueError, match="capacity_factor"):
        ep.MoEConfig(**GOOD, router=router, capacity_factor=None)
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        ep.MoEConfig(**GOOD, router=router, eval_capacity_factor=None)


def test_hierarchical_exchange_needs_token_copies() -> None:
    assert ep.MoEConfig(**GOOD).exchange == "flat"
    with pytest.raises(ValueError, match=r"MoEConfig\.exchange='hierarchical'.*soft"):
        ep.MoEConfig(**GOOD, router="soft", exchange="hierarchical")


def test_group_size_and_examples_per_group_exclusive() -> None:
    with pytest.raises(ValueError, match="examples_per_group"):
        ep.MoEConfig(**GOOD, group_size=4, examples_per_group=1)


def test_defaults_match_contract() -> None:
    cfg = ep.MoEConfig(**GOOD)
    assert (cfg.top_k, cfg.router, cfg.capacity_factor, cfg.eval_capacity_factor) == (
        2, "topk", 1.25, 2.0)
    assert (cfg.expert_capacity, cfg.min_capacity, cfg.drop_policy, cfg.group_size) == (
        None, 4, "position", None)
    assert (cfg.slots_per_expert, cfg.activation, cfg.normalize_topk, cfg.bias) == (
        1, "gelu", True, False)
    assert (cfg.router_jitter, cfg.dropout, cfg.load_balance_coef, cfg.z_loss_coef) == (
        0.0, 0.0, 0.01, 0.001)
    assert cfg.dtype == torch.float32 and cfg.router_dtype == torch.float32


def test_dtype_names_and_frozen() -> None:
    cfg = ep.MoEConfig(**GOOD, dtype="bfloat16")
    assert cfg.dtype == torch.bfloat16
    with pytest.raises(AttributeError):
        cfg.top_k = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="top_k"):
        cfg.replace(top_k=9)


def test_capacity_formula() -> None:
    from expert_parallel.ops.routing import capacity
    cfg = ep.MoEConfig(d_model=4, d_ff=4, num_experts=8, top_k=2, capacity_factor=1.25,
                       min_capacity=0)
    assert capacity(cfg, 4096, training=True) == 1280  # 1.25 * 4096 * 2 / 8
    assert capacity(cfg, 10, training=True) == 4  # ceil(3.125)
    assert capacity(cfg, 10, training=False) == 5  # eval factor 2.0: ceil(5.0), no float slack
    cfg11 = cfg.replace(capacity_factor=1.1, top_k=1, num_experts=1)
    assert capacity(cfg11, 10, training=True) == 11  # 1.1 * 10 is 11.000000000000002 in floats
    assert capacity(cfg.replace(min_capacity=7), 10, training=True) == 7
    assert capacity(cfg.replace(expert_capacity=3), 4096, training=True) == 3
    assert capacity(cfg.replace(capacity_factor=None), 10, training=True) is None
