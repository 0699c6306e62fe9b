"""The routers as public modules, usable on their own."""

from __future__ import annotations

import torch

import expert_parallel as ep


def test_topk_router_outputs() -> None:
    torch.manual_seed(0)
    B, L, D, E, K = 2, 5, 8, 6, 3
    router = ep.TopKRouter(D, E, K)
    x = torch.randn(B, L, D)
    gates, idx, probs = router(x)
    assert gates.shape == (B, L, K) and idx.shape == (B, L, K) and probs.shape == (B, L, E)
    assert idx.dtype == torch.int64 and idx.min() >= 0 and idx.max() < E
    torch.testing.assert_close(gates.sum(-1), torch.ones(B, L))
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, L))
    ref = torch.softmax(x @ router.weight.T, -1)
    torch.testing.assert_close(probs, ref)
    # indices are the K most probable experts, best first; gates are their renormalised probs
    top = ref.topk(K, -1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(gates, top.values / top.values.sum(-1, keepdim=True))


def test_unnormalized_gates_are_the_probs() -> None:
    router = ep.TopKRouter(8, 4, 2, normalize_topk=False)
    gates, idx, probs = router(torch.randn(3, 8))
    torch.testing.assert_close(gates, probs.gather(-1, idx))


def test_noisy_router_eval_equals_topk_and_train_is_noisy() -> None:
    torch.manual_seed(1)
    noisy = ep.NoisyTopKRouter(8, 4, 2)
    plain = ep.TopKRouter(8, 4, 2)
    plain.weight.data.copy_(noisy.weight.data)
    x = torch.randn(16, 8)
    noisy.eval()
    for a, b in zip(noisy(x), plain(x), strict=True):
        assert torch.equal(a, b)
    noisy.train()
    assert not torch.equal(noisy(x).probs, plain(x).probs)
    assert tuple(noisy.state_dict()) == ("weight", "noise.weight")


def test_router_of_moe_is_public_class() -> None:
    cfg = ep.MoEConfig(d_model=8, d_ff=8, num_experts=4, router="noisy_topk")
    assert type(ep.MoE(cfg).router) is ep.NoisyTopKRouter
    assert type(ep.MoE(cfg.replace(router="topk")).router) is ep.TopKRouter


def test_router_bad_arguments() -> None:
    import pytest
    with pytest.raises(ValueError, match="top_k"):
        ep.TopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="router_jitter"):
        ep.TopKRouter(8, 4, 2, jitter=2.0)
