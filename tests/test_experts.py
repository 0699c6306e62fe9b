"""Experts and FeedForward: one expert equals the dense FFN; layout-independent initialisation."""

from __future__ import annotations

import pytest
import torch

import expert_parallel as ep
from expert_parallel.ops.experts import GroupedExperts
from expert_parallel.ops.experts import ffn as expert_ffn


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "geglu", "clamped_swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_one_expert_equals_feedforward(activation: str, bias: bool) -> None:
    """E=1, K=1, capacity >= tokens: the MoE is exactly the dense FFN (outputs and gradients)."""
    torch.manual_seed(0)
    D, F = 8, 16
    ffn = ep.FeedForward(D, F, activation=activation, bias=bias)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_()
    moe = ep.MoE(ep.MoEConfig(d_model=D, d_ff=F, num_experts=1, top_k=1, capacity_factor=1.0,
                              activation=activation, bias=bias))
    moe.load_state_dict({"router.weight": moe.router.weight.detach(),
                         **{f"experts.{k}": v[None] for k, v in ffn.state_dict().items()}})
    x = torch.randn(3, 5, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_moe, aux = moe(x1)
    y_ffn = ffn(x2)
    torch.testing.assert_close(y_moe, y_ffn)
    assert aux.dropped_fraction == 0
    w = torch.randn_like(y_ffn)
    (y_moe * w).sum().backward()
    (y_ffn * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for name, p in ffn.named_parameters():
        torch.testing.assert_close(getattr(moe.experts, name).grad[0], p.grad, msg=name)


def test_feedforward_dropout_and_shape_error() -> None:
    ffn = ep.FeedForward(8, 16, dropout=0.5)
    x = torch.randn(4, 16, 8)
    assert (ffn.train()(x) == 0).float().mean() > 0.3
    assert (ffn.eval()(x) != 0).all()
    with pytest.raises(ValueError, match="d_model"):
        ffn(torch.randn(2, 7))
    with pytest.raises(ValueError, match="activation"):
        ep.FeedForward(8, 16, activation="tanh")


def test_initialisation_is_layout_independent() -> None:
    cfg = ep.MoEConfig(d_model=8, d_ff=16, num_experts=8, activation="swiglu", bias=True)
    full = GroupedExperts(cfg, base_seed=1234)
    for first, count in [(0, 4), (4, 4), (2, 2), (6, 2), (7, 1)]:
        part = GroupedExperts(cfg, base_seed=1234, num_local=count, first=first)
        for name, p in part.named_parameters():
            assert torch.equal(p, getattr(full, name)[first:first + count]), (name, first)


def test_same_seed_same_layer_and_consecutive_layers_differ() -> None:
    cfg = ep.MoEConfig(d_model=8, d_ff=16, num_experts=4)
    torch.manual_seed(7)
    a1, a2 = ep.MoE(cfg), ep.MoE(cfg)
    torch.manual_seed(7)
    b1 = ep.MoE(cfg)
    for (name, p), q in zip(a1.state_dict().items(), b1.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(a1.experts.w_in, a2.experts.w_in)
    assert not torch.equal(a1.router.weight, a2.router.weight)
    # experts differ from one another
    assert not torch.equal(a1.experts.w_in[0], a1.experts.w_in[1])


def test_state_dict_keys_and_shapes() -> None:
    E, D, F = 4, 8, 16
    cfg = ep.MoEConfig(d_model=D, d_ff=F, num_experts=E, router="noisy_topk",
                       activation="geglu", bias=True)
    shapes = {k: tuple(v.shape) for k, v in ep.MoE(cfg).state_dict().items()}
    assert shapes == {
        "router.weight": (E, D), "router.noise.weight": (E, D),
        "experts.w_in": (E, D, F), "experts.w_gate": (E, D, F), "experts.w_out": (E, F, D),
        "experts.b_in": (E, F), "experts.b_gate": (E, F), "experts.b_out": (E, D),
    }
    plain = ep.MoE(cfg.replace(router="topk", activation="relu", bias=False)).state_dict()
    assert set(plain) == {"router.weight", "experts.w_in", "experts.w_out"}
    dense = ep.FeedForward(D, F, activation="swiglu", bias=True).state_dict()
    assert {k: tuple(v.shape) for k, v in dense.items()} == {
        "w_in": (D, F), "w_gate": (D, F), "w_out": (F, D), "b_in": (F,), "b_gate": (F,),
        "b_out": (D,)}


def test_full_state_dict_round_trip_and_bad_state_dicts() -> None:
    cfg = ep.MoEConfig(d_model=8, d_ff=16, num_experts=4, bias=True)
    torch.manual_seed(0)
    src = ep.MoE(cfg)
    dst = ep.MoE(cfg)
    dst.load_full_state_dict(src.full_state_dict())
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    good = src.state_dict()
    missing = {k: v for k, v in good.items() if k != "experts.w_out"}
    with pytest.raises(ValueError, match=r"missing keys \['experts.w_out'\]"):
        dst.load_full_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        dst.load_full_state_dict({**good, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'experts.w_in' has shape \(3, 8, 16\), expected \(4, 8, 16\)"):
        dst.load_full_state_dict({**good, "experts.w_in": good["experts.w_in"][:3]})
    with pytest.raises(ValueError, match=r"router\.weight"):
        dst.load_full_state_dict({**good, "router.weight": torch.zeros(4, 9)})


@pytest.mark.parametrize("activation", ["gelu", "swiglu", "clamped_swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_segmented_rows_equal_a_per_row_loop(activation: str, bias: bool) -> None:
    """Rows ordered (segment, expert), with repeated experts and empty segments: outputs and every
    gradient equal each row run alone through its expert's FFN (the literal definition)."""
    torch.manual_seed(0)
    cfg = ep.MoEConfig(d_model=8, d_ff=16, num_experts=3, activation=activation, bias=bias)
    experts = GroupedExperts(cfg, base_seed=7)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_()
    counts_Re = torch.tensor([[2, 0, 3], [1, 4, 0], [0, 0, 2]])  # 3 segments (e.g. source ranks)
    x = torch.randn(int(counts_Re.sum()), 8, requires_grad=True)
    w_out = torch.randn(x.shape[0], 8)
    (experts(x, counts_Re) * w_out).sum().backward()
    grads = {name: p.grad.clone() for name, p in experts.named_parameters()}
    x_grad = x.grad.clone()
    experts.zero_grad()
    x.grad = None
    expert_N = torch.arange(3).repeat(3).repeat_interleave(counts_Re.reshape(-1))
    rows = [expert_ffn(x[n:n + 1], {k: v[int(j)] for k, v in experts.weights().items()}, activation)
            for n, j in enumerate(expert_N)]
    expected = torch.cat(rows)
    (expected * w_out).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4)  # N(0, 1) weights: values of order 10-100, summed in other orders
    torch.testing.assert_close(experts(x.detach(), counts_Re), expected.detach(), **tol)
    torch.testing.assert_close(x_grad, x.grad, **tol)
    for name, p in experts.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name, **tol)


@pytest.mark.parametrize("segments", [1, 2])
def test_experts_without_rows_still_join_the_backward(segments: int) -> None:
    """No rows at all: the output is empty but part of the graph, and every weight gradient is zero
    (one segment runs the CPU grouped_mm path, whose backward sees a [0, 0]-strided gradient)."""
    cfg = ep.MoEConfig(d_model=8, d_ff=16, num_experts=2)
    experts = GroupedExperts(cfg, base_seed=7)
    x = torch.randn(0, 8, requires_grad=True)
    y = experts(x, torch.zeros(segments, 2, dtype=torch.int64))
    assert y.shape == (0, 8) and y.requires_grad
    y.sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in experts.parameters())


def test_grouped_mm_path_reorders_segments_to_expert_major(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path (grouped_mm over expert-major groups) on rows from several segments: forced on
    CPU, where torch's grouped_mm has a forward, it must equal the segment_mm path."""
    import torch.nn.functional as F

    from expert_parallel.ops import experts as experts_module
    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    torch.manual_seed(0)
    cfg = ep.MoEConfig(d_model=16, d_ff=32, num_experts=3, activation="swiglu", bias=True)
    experts = GroupedExperts(cfg, base_seed=7)
    counts_Re = torch.tensor([[2, 0, 3], [1, 4, 0], [0, 0, 2]])
    x = torch.randn(int(counts_Re.sum()), 16)
    with torch.no_grad():
        expected = experts(x, counts_Re)
        monkeypatch.setattr(experts_module, "_can_use_grouped_mm", lambda *_: True)
        try:
            got = experts(x, counts_Re)
        except (RuntimeError, NotImplementedError) as err:
            pytest.skip(f"grouped_mm has no CPU kernel here: {err}")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_cpu_grouped_mm_path_equals_segment_mm(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                               activation: str) -> None:
    """One segment of expert-major rows (one process) on CPU runs torch's grouped_mm with our
    backward; an expert without rows included, outputs and every gradient must equal the segment_mm
    path bit for bit (both are the same mm per expert)."""
    from expert_parallel.ops import experts as experts_module
    torch.manual_seed(0)
    cfg = ep.MoEConfig(d_model=16, d_ff=32, num_experts=4, activation=activation, bias=True, dtype=dtype)
    experts = GroupedExperts(cfg, base_seed=7)
    counts_e = torch.tensor([5, 0, 3, 6])
    x = torch.randn(int(counts_e.sum()), 16, dtype=dtype)
    if not experts_module._can_use_cpu_grouped_mm(x, 16, 32):
        pytest.skip("this torch has no CPU grouped_mm kernel")
    w_out = torch.randn(x.shape[0], 16, dtype=dtype)

    def run() -> tuple[torch.Tensor, ...]:
        experts.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_()
        y = experts(x_leaf, counts_e)
        (y.float() * w_out.float()).sum().backward()
        return (y.detach(), x_leaf.grad, *(p.grad.clone() for p in experts.parameters()))

    grouped = run()
    monkeypatch.setattr(experts_module, "_can_use_cpu_grouped_mm", lambda *_: False)
    segment = run()
    for name, a, b in zip(["y", "x.grad", *experts.weights()], grouped, segment, strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(grouped[2 + list(experts.weights()).index("w_in")][1],
                       torch.zeros(16, 32, dtype=dtype))  # the expert without rows


def test_bf16_weight_gradient_of_several_segments_sums_in_fp32() -> None:
    """An expert fed by several source ranks: each segment's product rounded once, the sum in fp32
    and cast once (a bf16 running sum would round once per source); an expert without rows: zero."""
    from expert_parallel.ops.experts import segment_mm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g).bfloat16().requires_grad_()
    w = torch.randn(3, 8, 4, generator=g).bfloat16().requires_grad_()
    segs = [(0, 10, 0), (10, 18, 1), (18, 30, 0), (30, 40, 0)]  # expert 0 three times, expert 2 never
    y = segment_mm(x, w, segs)
    gy = torch.randn(y.shape, generator=g).bfloat16()
    y.backward(gy)
    assert w.grad is not None and w.grad.dtype == torch.bfloat16
    want0 = sum((x[a:b].detach().t() @ gy[a:b]).float() for a, b, j in segs if j == 0)
    assert torch.equal(w.grad[0], want0.bfloat16())
    assert torch.equal(w.grad[1], x[10:18].detach().t() @ gy[10:18])
    assert torch.equal(w.grad[2], torch.zeros_like(w.grad[2]))


def test_fused_grouped_mm_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """grouped_mm on CUDA only where torch runs its fused kernel: bf16 on compute capability 9.0 or
    10.x (elsewhere torch copies the offsets to the host and loops); never on the CPU path."""
    from expert_parallel.ops import experts as module
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module, "grouped_mm_works", lambda device, dtype: True)
    cuda = torch.device("cuda", 0)
    for capability, dtype, fused in [((9, 0), torch.bfloat16, True), ((10, 0), torch.bfloat16, True),
                                     ((8, 0), torch.bfloat16, False), ((8, 9), torch.bfloat16, False),
                                     ((9, 0), torch.float16, False), ((9, 0), torch.float32, False),
                                     ((12, 0), torch.bfloat16, False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert module.fused_grouped_mm(cuda, dtype) is fused, (capability, dtype)
    assert not module.fused_grouped_mm(torch.device("cpu"), torch.bfloat16)
