"""MoE layers composed with the PyTorch training stack, against the single-device reference:
activation checkpointing, DistributedDataParallel (ep.data_parallel; plain DDP refused), gradient
accumulation, bucketed gradient reduction (tests/workers/compose.py on real gloo groups)."""

from __future__ import annotations

import sys

import pytest
import torch

import expert_parallel as ep
from expert_parallel.comm.grads import buckets
from tests.procs import WORKERS, run, torchrun


@pytest.mark.parametrize("world, ep_size", [(2, 2), (4, 2)], ids=["ep2", "ep2xdp2"])
def test_every_composition_equals_the_reference(world: int, ep_size: int) -> None:
    """Activation checkpointing, data_parallel, plain DDP refused, meta-device init, fully_shard
    (gradient accumulation, checkpoints across layouts, bf16 parameters) at EP 2 and EP 2 x DP 2."""
    out = torchrun(world, "compose.py", "--ep-size", str(ep_size))
    assert f"ALL OK 5 with {world} ranks, ep_size {ep_size}" in out, out[-3000:]


def test_fully_shard_with_fewer_local_experts_than_replicas() -> None:
    """2 experts on every rank, 4 replicas: fully_shard shards the experts' dim 1."""
    out = torchrun(4, "compose.py", "--ep-size", "1", "--num-experts", "2", "--checks", "fully_shard")
    assert "ALL OK 1 with 4 ranks, ep_size 1" in out, out[-3000:]


def test_one_process() -> None:
    out = run([sys.executable, str(WORKERS / "compose.py")], timeout=300)
    assert "ALL OK 5 with 1 ranks, ep_size 1" in out, out[-3000:]


def test_buckets_hold_one_dtype_and_at_most_the_size() -> None:
    f32 = [torch.zeros(10), torch.zeros(10), torch.zeros(30)]  # 40, 40, 120 bytes
    bf16 = [torch.zeros(4, dtype=torch.bfloat16)]
    groups = buckets([*f32, *bf16], max_bytes=100)
    assert [[t.numel() for t in g] for g in groups] == [[10, 10], [30], [4]]
    assert all(len({t.dtype for t in g}) == 1 for g in groups)
    assert buckets([], 100) == []


INIT_CONFIGS = {
    "topk": dict(),
    "noisy_topk": dict(router="noisy_topk"),
    "expert_choice": dict(router="expert_choice"),
    "soft": dict(router="soft", slots_per_expert=2),
    "deepseek": dict(score_func="sigmoid", bias_update_rate=0.01, num_expert_groups=4, num_limited_groups=2,
                     num_shared_experts=1, shared_expert_gate=True, activation="swiglu", bias=True),
    "bf16_router_bias": dict(dtype=torch.bfloat16, activation="geglu", router_bias=True),
}


def _state(moe: ep.MoE) -> dict[str, torch.Tensor]:
    return {**moe.state_dict(), **{n: b for n, b in moe.named_buffers()}}


@pytest.mark.parametrize("overrides", INIT_CONFIGS.values(), ids=INIT_CONFIGS.keys())
def test_meta_build_then_reset_equals_a_direct_build(overrides: dict) -> None:
    cfg = ep.MoEConfig(d_model=16, d_ff=24, num_experts=8, **overrides)
    torch.manual_seed(0)
    direct = ep.MoE(cfg)
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = ep.MoE(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(123)
    meta.reset_parameters()
    after_reset = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after_reset)  # reset_parameters leaves the global stream alone
    want, got = _state(direct), _state(meta)
    assert want.keys() == got.keys() and meta.base_seed == direct.base_seed
    for key in want:
        assert torch.equal(got[key], want[key]) and got[key].dtype == want[key].dtype, key
    x = torch.randn(2, 5, 16, dtype=cfg.dtype)
    assert torch.equal(meta.eval()(x)[0], direct.eval()(x)[0])


def test_reset_restores_the_initial_values_and_meta_is_refused() -> None:
    cfg = ep.MoEConfig(d_model=8, d_ff=16, num_experts=4, bias_update_rate=0.1)
    torch.manual_seed(0)
    moe = ep.MoE(cfg)
    initial = {k: v.clone() for k, v in _state(moe).items()}
    y, aux = moe(torch.randn(2, 3, 8))
    (y.sum() + aux.loss).backward()
    torch.optim.SGD(moe.parameters(), lr=1.0).step()
    ep.update_expert_bias(moe)
    moe(torch.randn(2, 3, 8))
    assert not torch.equal(moe.router.weight, initial["router.weight"])
    moe.reset_parameters()
    for key, value in _state(moe).items():
        assert torch.equal(value, initial[key]), key
    with pytest.raises(ValueError, match="meta device"):
        ep.MoE(cfg, device="meta").reset_parameters()
    assert all(p.is_meta for p in ep.MoE(cfg, device="meta").parameters())
