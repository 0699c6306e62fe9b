"""The training wrappers in uneven cases (issue #33), against the single-device model, on real gloo
groups (tests/workers/uneven_wrappers.py): fully_shard with fp16 gradients at one replica of the
experts, one MoE layer called twice under (reentrant) activation checkpointing inside
ep.data_parallel, and ranks without tokens under sync_gradients, data_parallel and fully_shard."""

from __future__ import annotations

import pytest
import torch

import expert_parallel as ep
from tests.procs import torchrun

ROUTERS = {
    "topk": dict(),
    "dropless": dict(capacity_factor=None, bias_update_rate=0.01),
    "noisy_topk": dict(router="noisy_topk"),
    "expert_choice": dict(router="expert_choice"),
    "soft": dict(router="soft", slots_per_expert=2),
    "shared_groups": dict(num_shared_experts=1, shared_expert_gate=True, activation="swiglu",
                          examples_per_group=1, seq_aux_loss_coef=0.1),
}


@pytest.mark.parametrize("overrides", ROUTERS.values(), ids=ROUTERS.keys())
def test_a_batch_without_tokens_uses_every_parameter(overrides: dict) -> None:
    """One process: x of shape [0, L, D] and [B, 0, D], in training and eval: an empty output of the
    input's shape, a zero gradient (not None) for every parameter the layer uses on tokens, zero
    aux and counts, nothing added to the routers' load."""
    cfg = ep.MoEConfig(d_model=8, d_ff=12, num_experts=4, **overrides)
    torch.manual_seed(0)
    moe = ep.MoE(cfg)
    for shape in [(0, 3, 8), (2, 0, 8)]:
        for training in (True, False):
            moe.train(training).zero_grad(set_to_none=True)
            x_BLD = torch.randn(shape, requires_grad=True)
            y_BLD, aux = moe(x_BLD)
            (y_BLD.sum() + aux.loss).backward()
            assert y_BLD.shape == shape and x_BLD.grad is not None
            for name, p in moe.named_parameters():
                if name == "router.noise.weight" and not training:
                    continue  # the noise is a training-time term
                assert p.grad is not None and not p.grad.any(), (shape, training, name)
            for value in (aux.loss, aux.load_balance_loss, aux.z_loss, aux.dropped_fraction,
                          aux.max_violation, aux.seq_balance_loss):
                assert float(value) == 0.0, (shape, training, aux)
            assert not aux.expert_counts.any()
    if cfg.bias_update_rate is not None:
        assert not moe.router.expert_load.any()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world, ep_size", [(2, 2), (4, 2)], ids=["w2", "w4"])
def test_uneven_cases_equal_the_single_device_model(world: int, ep_size: int) -> None:
    """fp16 gradients under fully_shard (dp 1 included), a layer called twice under reentrant,
    mixed, nested and non-reentrant checkpointing in data_parallel (one expert reduction per
    backward), and an empty rank ([0, L, D], then [B, 0, D]) training two steps and evaluating
    under every wrapper at every expert-parallel size the world allows."""
    out = torchrun(world, "uneven_wrappers.py", "--ep-size", str(ep_size), timeout=200)
    assert f"ALL OK 3 with {world} ranks, ep_size {ep_size}" in out, out[-3000:]
