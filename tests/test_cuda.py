"""The GPU suite (marker ``cuda``; skipped without CUDA). ``bash tests/gpu_suite.sh`` runs it all.

On one GPU: the MoE on the GPU equals the CPU reference (fp32) and routes exactly like fp32 (bf16,
and fp32 master weights under bf16 autocast) with outputs at bf16 resolution; grouped_mm forward and
backward equal the segment loop; the training example runs 20 steps; the bf16 benchmark prints
TFLOP/s and the fraction of the GPU's dense peak; the all-to-all exchange over a one-rank NCCL group
equals the local path. With two or more GPUs: expert parallelism over NCCL equals the
single-device reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import expert_parallel as ep
from expert_parallel.ops import experts as experts_module
from tests.helpers import build, check_low_precision
from tests.procs import ROOT, WORKERS, run

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROUTERS = [dict(capacity_factor=1.0), dict(capacity_factor=None), dict(router="expert_choice"),
           dict(router="soft"), dict(capacity_factor=None, activation="swiglu", bias=True)]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("overrides", ROUTERS)
def test_fp32_on_the_gpu_equals_the_cpu_reference(overrides: dict) -> None:
    cfg = dict(d_model=64, d_ff=128, num_experts=8, top_k=2, min_capacity=1, **overrides)
    cpu = build(cfg)
    gpu = build(cfg).to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(4, 32, 64)
    y_cpu, aux_cpu = cpu(x.clone().requires_grad_())
    x_gpu = x.to(CUDA).requires_grad_()
    y_gpu, aux_gpu = gpu(x_gpu)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    assert torch.equal(aux_gpu.expert_counts.cpu(), aux_cpu.expert_counts)
    for field in ("loss", "dropped_fraction"):
        assert getattr(aux_gpu, field).device.type == "cuda", field
        torch.testing.assert_close(getattr(aux_gpu, field).cpu(), getattr(aux_cpu, field),
                                   rtol=1e-4, atol=1e-6)
    (y_cpu.square().sum() + aux_cpu.loss).backward()
    (y_gpu.square().sum() + aux_gpu.loss).backward()
    for (name, p), q in zip(gpu.named_parameters(), cpu.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("overrides", ROUTERS)
def test_bf16_on_the_gpu_routes_like_fp32(overrides: dict) -> None:
    cfg = dict(d_model=64, d_ff=128, num_experts=8, top_k=2, min_capacity=1, **overrides)
    low = build({**cfg, "dtype": "bfloat16"}).to(CUDA)
    ref = build(cfg).to(CUDA)
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    check_low_precision(low, ref, torch.randn(4, 32, 64, device=CUDA, dtype=torch.bfloat16))


def test_fp32_master_weights_under_bf16_autocast_reach_grouped_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    if not experts_module.fused_grouped_mm(CUDA, torch.bfloat16):
        pytest.skip("torch's grouped_mm does not run on this GPU in bf16 (the segment loop serves)")
    calls = []
    original = experts_module._native_grouped_mm
    monkeypatch.setattr(experts_module, "_native_grouped_mm",
                        lambda *a: calls.append(a[0].dtype) or original(*a))
    cfg = dict(d_model=64, d_ff=128, num_experts=8, top_k=2, capacity_factor=None, activation="swiglu")
    moe = build(cfg).to(CUDA)
    ref = build(cfg).to(CUDA)
    ref.load_state_dict(moe.state_dict())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux, _, _ = check_low_precision(moe, ref, torch.randn(4, 32, 64, device=CUDA), autocast=True)
        (y.square().sum() + aux.loss).backward()
    assert y.dtype == torch.float32 and calls.count(torch.bfloat16) == 3, calls  # swiglu: 3 GEMMs
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in moe.parameters())


@pytest.mark.parametrize("overrides", ROUTERS)
def test_built_on_the_gpu_or_on_meta_then_reset_on_the_gpu_alike(overrides: dict) -> None:
    """Under torch.device("cuda") the experts come from CPU generators (no CPU generator is handed a
    GPU tensor) and the rest from the GPU's; a meta build reset on the GPU gives the same values."""
    cfg = ep.MoEConfig(d_model=16, d_ff=32, num_experts=8, **overrides)
    torch.manual_seed(0)
    with CUDA:
        direct = ep.MoE(cfg)
    assert all(p.device.type == "cuda" for p in direct.parameters())
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = ep.MoE(cfg)
    meta.to_empty(device=CUDA).reset_parameters()
    for key, value in direct.state_dict().items():
        assert torch.equal(meta.state_dict()[key], value), key
    torch.manual_seed(0)
    on_cpu = ep.MoE(cfg)  # the experts do not depend on the device
    torch.testing.assert_close(direct.experts.w_in.cpu(), on_cpu.experts.w_in, rtol=0, atol=0)


@pytest.mark.parametrize("sources", [1, 3])
def test_grouped_mm_forward_and_backward_equal_the_segment_loop(sources: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if not experts_module.fused_grouped_mm(CUDA, torch.bfloat16):
        pytest.skip("torch's grouped_mm does not run on this GPU in bf16")
    cfg = ep.MoEConfig(d_model=64, d_ff=128, num_experts=4, activation="swiglu", bias=True, dtype="bfloat16")
    experts = experts_module.GroupedExperts(cfg, base_seed=1).to(CUDA)
    counts = torch.tensor([[5, 0, 17, 9]] * sources, device=CUDA)
    x = torch.randn(int(counts.sum()), 64, device=CUDA, dtype=torch.bfloat16)

    def run_once() -> tuple[torch.Tensor, ...]:
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        y = experts(xi, counts)
        y.float().square().sum().backward()
        return (y, xi.grad, *(p.grad for p in experts.parameters()))

    native = run_once()
    monkeypatch.setattr(experts_module, "_can_use_grouped_mm", lambda *_: False)
    loop = run_once()
    for a, b in zip(native, loop, strict=True):
        bound = 4 * torch.finfo(torch.bfloat16).eps * b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=bound)


def _compiled_step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output, expert counts, input gradient and parameter gradients of one forward/backward."""
    x = x.clone().requires_grad_()
    y, aux = model(x)
    (y.float().square().mean() + aux.loss).backward()
    params = getattr(model, "_orig_mod", model)
    return (y.detach(), aux.expert_counts, x.grad, *(p.grad for p in params.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("overrides", ROUTERS)
def test_fullgraph_compile_on_the_gpu_equals_eager(overrides: dict, dtype: torch.dtype) -> None:
    """One process, fullgraph=True: outputs, routing and gradients equal eager's (fp32: to rounding
    of fused kernels; bf16: within 4 bf16 eps of each tensor's scale, where the expert GEMMs run
    torch's fused grouped_mm on device offsets inside the compiled graph)."""
    import copy

    torch._dynamo.reset()
    cfg = dict(d_model=64, d_ff=128, num_experts=8, top_k=2, min_capacity=1, dtype=dtype, **overrides)
    eager = build(cfg).to(CUDA)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = torch.randn(4, 32, 64, device=CUDA, dtype=dtype)
    want, got = _compiled_step(eager, x), _compiled_step(compiled, x)
    assert torch.equal(got[1], want[1])  # the same routing
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        scale = b.float().abs().max().item()
        atol = 1e-5 * max(scale, 1.0) if dtype == torch.float32 else 4 * torch.finfo(dtype).eps * scale
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4 if dtype == torch.float32 else 0,
                                   atol=atol)


def test_compiled_bf16_expert_gemms_run_torchs_fused_grouped_kernel() -> None:
    """Compiled, the bf16 expert GEMMs are still torch's grouped GEMM on device offsets, not the
    segment loop's operator (which reads the counts on the host)."""
    from torch.profiler import ProfilerActivity, profile

    if not experts_module.fused_grouped_mm(CUDA, torch.bfloat16):
        pytest.skip("torch's fused grouped_mm does not run on this GPU")
    torch._dynamo.reset()
    cfg = dict(capacity_factor=None, d_model=256, d_ff=512, num_experts=8, dtype=torch.bfloat16)
    moe = torch.compile(build(cfg).to(CUDA), fullgraph=True)
    x = torch.randn(4, 64, 256, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # the first call compiles
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            y, aux = moe(x)
            (y.float().square().mean() + aux.loss).backward()
            torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    # aten::_grouped_mm, or inductor's own grouped-GEMM template where it picks one
    assert sum("grouped_mm" in n for n in names) >= 2, sorted(set(names))
    assert not [n for n in names if "segment_mm" in n], sorted(set(names))


def test_training_example_learns_on_one_gpu(tmp_path: Path) -> None:
    """30 steps on NCCL: the mean loss of the last 10 steps is below the first 10's by 0.3 nats
    or more (a byte-level LM starts near ln 256 ≈ 5.5 and falls fast)."""
    out = run([sys.executable, str(ROOT / "examples" / "train_lm.py"), "--steps", "30", "--backend", "nccl",
               "--eval-every", "30", "--log-every", "10", "--out", str(tmp_path)], timeout=300)
    assert "nccl on cuda:0" in out, out[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_loss"] < summary["initial_loss"] - 0.3, summary


def test_bf16_expert_gemms_run_torchs_fused_grouped_kernel() -> None:
    """Profiled forward and backward in bf16: the expert GEMMs are aten::_grouped_mm calls, none of
    which runs torch's fallback (one aten::mm per group, with the offsets read on the host)."""
    from torch.profiler import ProfilerActivity, profile

    if not experts_module.fused_grouped_mm(CUDA, torch.bfloat16):
        pytest.skip("torch's fused grouped_mm does not run on this GPU (see docs/architecture.md)")
    cfg = dict(capacity_factor=None, d_model=256, d_ff=512, num_experts=8, dtype=torch.bfloat16)
    moe = build(cfg).to(CUDA)
    x = torch.randn(4, 64, 256, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        y, aux = moe(x)
        (y.float().square().mean() + aux.loss).backward()
        torch.cuda.synchronize()
    grouped = [e for e in prof.events() if e.name == "aten::_grouped_mm"]
    assert len(grouped) >= 2, sorted({e.name for e in prof.events()})  # two in the forward at least
    assert not [c.name for e in grouped for c in e.cpu_children if c.name in ("aten::mm", "aten::matmul")]


def test_two_ranks_on_one_gpu_with_nccl_fail_at_once_naming_the_fix(tmp_path: Path) -> None:
    """torchrun with one more rank than GPUs and backend='nccl' (the default picks gloo there):
    both ranks of a shared GPU stop in init_distributed with a ValueError naming backend='gloo',
    instead of NCCL's "Duplicate GPU detected" at the first collective."""
    n = torch.cuda.device_count() + 1
    code = "import expert_parallel as ep; ep.init_distributed(backend='nccl')"
    script = tmp_path / "two_on_one_gpu.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}\n")
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               str(script)], timeout=180, expect_failure=True)
    assert "on one GPU" in out and "backend='gloo'" in out, out[-3000:]


def test_cpu_and_cuda_tensors_reach_every_rank_of_an_nccl_job() -> None:
    """The job's NCCL groups also carry gloo: a CPU tensor and a CUDA tensor all-reduced over the
    default group and over the expert-parallel group (one rank per GPU, up to two)."""
    n = min(torch.cuda.device_count(), 2)
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               str(WORKERS / "nccl_cpu_tensors.py")], timeout=300)
    assert out.count("OK cpu and cuda") == n, out[-3000:]


def test_the_exchange_over_a_one_rank_nccl_group_equals_the_local_path() -> None:
    """One GPU exercises NCCL: the all-to-all dispatcher over a one-rank NCCL group (count
    all-gather, the autograd all-to-all, capacity and dropless) gives what the local path gives,
    for every router, in fp32 and under bf16 autocast."""
    out = run([sys.executable, str(WORKERS / "single_process.py"), "--backend", "nccl"], timeout=300)
    assert "ALL OK" in out and "bf16 autocast" in out, out[-3000:]


def test_bench_in_bf16_prints_tflops_and_the_fraction_of_peak(tmp_path: Path) -> None:
    out = run([sys.executable, "-m", "expert_parallel", "bench", "--backend", "nccl", "--dtype", "bfloat16",
               "--tokens", "16384", "--d-model", "2048", "--d-ff", "4096", "--num-experts", "8",
               "--repeats", "5", "--no-deepspeed", "--json", str(tmp_path / "bench.json")], timeout=300)
    print(out)
    point = json.loads((tmp_path / "bench.json").read_text())["points"][0]
    assert point["expert_tflops"]["ours"] > 0
    if any(name in torch.cuda.get_device_name() for name in ("H100", "H200", "A100")):
        assert 0 < point["fraction_of_peak"]["ours"] < 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_expert_parallel_equals_the_reference() -> None:
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(WORKERS / "ep_equivalence.py"), "--ep-size", "2", "--backend", "nccl"], timeout=300)
    assert "ALL OK" in out, out[-3000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_compositions_on_nccl_equal_the_reference() -> None:
    """data_parallel, fully_shard, activation checkpointing, meta init and plain DDP refused, on NCCL
    (the default backend under torchrun with a GPU per rank), against the single-device reference."""
    from tests.procs import torchrun

    out = torchrun(2, "compose.py", "--ep-size", "2", timeout=600)
    assert "ALL OK 5 with 2 ranks, ep_size 2" in out, out[-3000:]


@pytest.mark.parametrize("overrides", [dict(capacity_factor=None), dict(capacity_factor=0.75),
                                       dict(capacity_factor=1.0, bias=True, activation="swiglu"),
                                       dict(router="expert_choice"), dict(router="soft")])
def test_one_process_bf16_forward_and_backward_never_sync(overrides: dict) -> None:
    """Where the fused grouped_mm takes device offsets, one process has no host sync at all, with a
    capacity too (a padded plan): torch.cuda.set_sync_debug_mode("error") raises on any."""
    if not experts_module.fused_grouped_mm(CUDA, torch.bfloat16):
        pytest.skip("no fused grouped_mm on this GPU (the segment loop reads the counts)")
    cfg = dict(d_model=64, d_ff=128, num_experts=8, top_k=2, dtype=torch.bfloat16, **overrides)
    moe = build(cfg).to(CUDA)
    x = torch.randn(4, 32, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    moe(x)  # the first call's replica check and kernel probes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = moe(x)
        (y.float().square().mean() + aux.loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("overrides", [dict(capacity_factor=0.75), dict(capacity_factor=1.0, bias=True,
                                                                      activation="swiglu")])
def test_padded_one_process_plan_equals_the_cut_plan_on_the_gpu(overrides: dict,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 with the fused grouped_mm: the padded capacity plan (the dropped rows past the last
    offset, which torch's kernels ignore) gives the output and every gradient of the plan cut with
    nonzero, to bf16 resolution."""
    import copy

    if not experts_module.fused_grouped_mm(CUDA, torch.bfloat16):
        pytest.skip("no fused grouped_mm on this GPU")
    cfg = dict(d_model=64, d_ff=128, num_experts=8, top_k=2, dtype=torch.bfloat16, **overrides)
    padded = build(cfg).to(CUDA)
    cut = copy.deepcopy(padded)
    x = torch.randn(4, 32, 64, device=CUDA, dtype=torch.bfloat16)
    want = None
    for model in (cut, padded):
        if model is cut:
            monkeypatch.setattr(type(model.experts), "takes_device_offsets", lambda self, x: False)
        else:
            monkeypatch.undo()
        got = _compiled_step(model, x)
        if want is None:
            want = got
    assert torch.equal(got[1], want[1]) and float(padded(x)[1].dropped_fraction) > 0
    for a, b in zip(got, want, strict=True):
        if a is not None:
            bound = 4 * torch.finfo(torch.bfloat16).eps * b.float().abs().max().item()
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=bound)


def test_grouped_mm_takes_a_rank_that_receives_zero_rows() -> None:
    """An expert-parallel rank whose experts received no rows runs grouped_mm on zero rows."""
    if not experts_module.fused_grouped_mm(CUDA, torch.bfloat16):
        pytest.skip("no fused grouped_mm on this GPU")
    w = torch.randn(4, 64, 128, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    x = torch.zeros(0, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    y = experts_module._native_grouped_mm(x, w, torch.zeros(4, dtype=torch.int32, device=CUDA))
    y.sum().backward()
    assert y.shape == (0, 128) and w.grad is not None and torch.equal(w.grad, torch.zeros_like(w.grad))


def test_checkpoints_resume_the_cuda_generators_exactly(tmp_path: Path) -> None:
    """N+1 steps equal N steps, save, load into a fresh model, 1 step, with dropout and noisy top-k
    (and router jitter) drawing from the CUDA generator."""
    ctx = ep.init_distributed()
    cfg = dict(d_model=64, d_ff=128, num_experts=8, top_k=2, router="noisy_topk", dropout=0.1,
               router_jitter=0.01, capacity_factor=None)

    def make() -> tuple[ep.MoE, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build(cfg).to(CUDA).train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(model: ep.MoE, opt: torch.optim.Optimizer) -> None:
        y, aux = model(torch.randn(2, 16, 64, device=CUDA))
        (y.square().mean() + aux.loss).backward()
        opt.step()
        opt.zero_grad()

    whole, opt = make()
    torch.cuda.manual_seed_all(1)
    for _ in range(3):
        step(whole, opt)
    part, opt = make()
    torch.cuda.manual_seed_all(1)
    for _ in range(2):
        step(part, opt)
    path = ep.save_checkpoint(tmp_path, part, opt, ctx, step=2)
    resumed, opt2 = make()
    torch.cuda.manual_seed_all(99)  # what the load must undo
    ep.load_checkpoint(path, resumed, opt2, ctx)
    step(resumed, opt2)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), whole.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
