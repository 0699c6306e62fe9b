"""Shared test helpers: build a layer, compare it with an oracle (outputs, aux, all gradients)."""

from __future__ import annotations

from collections.abc import Callable

import torch

import expert_parallel as ep

BASE = dict(d_model=8, d_ff=12, num_experts=4, top_k=2, min_capacity=1)

AUX_SCALARS = ("load_balance_loss", "z_loss", "router_entropy", "loss", "dropped_fraction",
               "seq_balance_loss", "max_violation")


def build(overrides: dict, seed: int = 0) -> ep.MoE:
    """An MoE from BASE + overrides, with non-zero biases (and a non-zero expert bias, where the
    router has one) so that tests see them."""
    torch.manual_seed(seed)
    moe = ep.MoE(ep.MoEConfig(**{**BASE, **overrides}))
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".b_" in name or name == "router.bias":
                p.normal_()
        if getattr(moe.router, "expert_bias", None) is not None:
            moe.router.expert_bias.copy_(torch.randn(moe.cfg.num_experts) * 0.3)
    return moe


def compare_with_oracle(moe: ep.MoE, x: torch.Tensor, training: bool,
                        oracle: Callable[[ep.MoE, torch.Tensor], tuple[torch.Tensor, dict]]) -> None:
    """MoE and oracle agree on outputs, every MoEAux field, and the gradients of input and params."""
    moe.train(training)
    x1 = x.clone().requires_grad_()
    y, aux = moe(x1)
    x2 = x.clone().requires_grad_()
    y_ref, aux_ref = oracle(moe, x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for field in AUX_SCALARS:
        torch.testing.assert_close(getattr(aux, field).double(),
                                   torch.as_tensor(aux_ref[field]).double(), rtol=1e-5, atol=1e-7,
                                   msg=field)
    assert torch.equal(aux.expert_counts, aux_ref["expert_counts"])
    w = torch.randn_like(y)
    params = [x1, *moe.parameters()]
    grads = torch.autograd.grad((y * w).sum() + aux.loss, params, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * w).sum() + aux_ref["loss"], [x2, *moe.parameters()],
                                    allow_unused=True)
    names = ["input", *(n for n, _ in moe.named_parameters())]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        if g_ref is None:
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        assert g is not None, name
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=name)


def check_low_precision(low: ep.MoE, ref: ep.MoE, x_low: torch.Tensor, autocast: bool = False) -> tuple:
    """``low`` (bf16 / fp16 parameters, or fp32 under autocast) against ``ref``, the fp32 layer with the
    same parameter values, on the same input values: routing decisions identical (the router runs in
    fp32 on equal values, so its logits are bitwise equal), outputs within 2 eps of the output scale
    (the resolution of the low dtype). Returns both outputs and aux."""
    dtype = torch.get_autocast_dtype(x_low.device.type) if autocast else low.experts.w_in.dtype
    x_ref = x_low.float()
    D = x_low.shape[-1]
    logits_low = low.router.logits(x_low.reshape(1, -1, D))
    logits_ref = ref.router.logits(x_ref.reshape(1, -1, D))
    assert logits_low.dtype == torch.float32 and torch.equal(logits_low, logits_ref)
    plan_low, _ = low._route(logits_low)
    plan_ref, _ = ref._route(logits_ref)
    for field in ("token_N", "expert_N", "slot_N", "counts_E"):
        assert torch.equal(getattr(plan_low, field), getattr(plan_ref, field)), field
    y, aux = low(x_low)
    with torch.autocast(x_low.device.type, enabled=False):  # the reference computes in fp32
        y_ref, aux_ref = ref(x_ref)
    assert y.dtype == x_low.dtype
    assert torch.equal(aux.expert_counts, aux_ref.expert_counts)
    assert aux.dropped_fraction.item() == aux_ref.dropped_fraction.item()
    bound = 2 * torch.finfo(dtype).eps * y_ref.abs().max().item()
    torch.testing.assert_close(y.float(), y_ref, rtol=0, atol=bound)
    return y, aux, y_ref, aux_ref
