"""Side effects of the library's helpers (issue #33): a checkpoint save leaves the optimizer alone
(no step before the first one, frozen parameters allowed), a resume replays the random stream,
``ep.grad_norm`` streams over bf16 gradients (fp32 sums, one fp32 copy of one piece at a time), and
``copy.deepcopy`` works on a model holding an MoE (one process, and a 2-rank expert-parallel group).

References: a run that never saved, an uninterrupted run, an fp64 norm, the original model.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import expert_parallel as ep
from expert_parallel.comm import grads
from tests.procs import torchrun


# ---- the 2-rank checks (one torchrun for all of them) ----
@pytest.fixture(scope="module")
def worker_out(tmp_path_factory: pytest.TempPathFactory) -> str:
    return torchrun(2, "checkpoint_safety.py", str(tmp_path_factory.mktemp("safety")), timeout=240)


def reported(out: str, check: str) -> None:
    """Both ranks printed ``OK check`` (the ranks' lines may interleave); else their failures."""
    failures = re.findall(rf"FAIL {check} rank \d: .*? END", out, flags=re.S)
    assert not failures, "\n".join(failures)
    assert sorted(re.findall(rf"OK {check} rank (\d)", out)) == ["0", "1"], out[-4000:]


def test_save_before_the_first_step_leaves_the_optimizer_alone(worker_out: str) -> None:
    """Save at step 0, then 3 Adam steps == 3 steps without the save (bitwise, step counts 3); the
    step-0 checkpoint loaded into a fresh model and optimizer trains to the same values."""
    reported(worker_out, "save_before_first_step")


def test_save_with_frozen_parameters_in_the_optimizer(worker_out: str) -> None:
    """Frozen router and expert weights inside AdamW: the save works, the load gives the same
    parameters and optimizer state, and two more steps agree bitwise."""
    reported(worker_out, "frozen_parameters")


def test_resume_replays_the_random_stream(worker_out: str) -> None:
    """torch.rand and the layer's dropout after a resume draw what the uninterrupted run draws."""
    reported(worker_out, "resume_random_stream")


def test_deepcopy_under_an_expert_parallel_group(worker_out: str) -> None:
    """copy.deepcopy of a model whose MoE holds a 2-rank group: same loss and gradients as the
    original, the same process groups, parameters of its own."""
    reported(worker_out, "deepcopy")


# ---- one process ----
def one_process_ctx() -> ep.DistContext:
    """A DistContext of one process without torch.distributed (grad_norm reads only sizes here)."""
    none = None
    return ep.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), ep_size=1,
                          dp_size=1, ep_rank=0, dp_rank=0, ep_group=none, dp_group=none,  # type: ignore[arg-type]
                          launcher="none", backend="gloo", mesh=none, world_group=none)  # type: ignore[arg-type]


def bf16_moe_with_grads() -> ep.MoE:
    """A bf16 MoE with gradients of widely different scales (one 2**20-element expert weight)."""
    torch.manual_seed(0)
    moe = ep.MoE(ep.MoEConfig(d_model=64, d_ff=256, num_experts=64, activation="swiglu",
                              dtype=torch.bfloat16))
    for i, p in enumerate(moe.parameters()):
        p.grad = (torch.randn(p.shape) * 10.0 ** (i - 2)).to(torch.bfloat16)
    return moe


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_grad_norm_of_bf16_gradients_matches_fp64(norm_type: float) -> None:
    moe = bf16_moe_with_grads()
    found = ep.grad_norm(moe, one_process_ctx(), norm_type)
    g64 = torch.cat([p.grad.double().reshape(-1) for p in moe.parameters() if p.grad is not None])
    expected = g64.abs().max() if norm_type == math.inf else g64.square().sum().sqrt()
    assert found.dtype == torch.float32
    torch.testing.assert_close(found.double(), expected, rtol=1e-6, atol=0)


def peak_cpu_bytes(fn: Callable[[], object], trace: Path) -> int:
    """The most bytes torch's CPU allocator held at once while ``fn`` ran, beyond what it held
    before (the profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    held_before = events[0]["Total Allocated"] - events[0]["Bytes"]  # what earlier tests left alive
    return max(e["Total Allocated"] for e in events) - held_before


def test_grad_norm_holds_one_fp32_piece_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 gradients of 3 x 2 MiB (+ small ones): grad_norm's allocations peak at one fp32 copy of
    one piece (``NORM_PIECE`` elements, 1 MiB here), where fp32 copies of every gradient take 12 MiB."""
    moe = bf16_moe_with_grads()
    piece = 2**18
    assert max(p.numel() for p in moe.parameters()) > piece
    monkeypatch.setattr(grads, "NORM_PIECE", piece, raising=False)
    peak = peak_cpu_bytes(lambda: ep.grad_norm(moe, one_process_ctx()), tmp_path / "trace.json")
    all_fp32 = sum(4 * p.numel() for p in moe.parameters())
    assert peak <= 4 * piece + 64 * 1024, f"peak {peak} bytes (fp32 copies of all gradients: {all_fp32})"


def test_clip_grad_norm_scales_to_the_fp64_bound() -> None:
    """clip_grad_norm_ returns the fp64 norm (fp32-tight) and leaves the bf16 gradients with norm
    max_norm (to bf16 rounding)."""
    moe = bf16_moe_with_grads()
    before = torch.cat([p.grad.double().reshape(-1) for p in moe.parameters() if p.grad is not None])
    total = ep.clip_grad_norm_(moe, 1.0, one_process_ctx())
    torch.testing.assert_close(total.double(), before.norm(), rtol=1e-6, atol=0)
    after = torch.cat([p.grad.double().reshape(-1) for p in moe.parameters() if p.grad is not None])
    torch.testing.assert_close(after.norm(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-2, atol=0)


def test_deepcopy_in_one_process() -> None:
    """A model holding an MoE (no process group): the copy's output and gradients equal the
    original's, its parameters are its own."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(ep.MoE(ep.MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2)))
    clone = copy.deepcopy(model)
    x = torch.randn(2, 5, 8)
    y, clone_y = model(x)[0], clone(x)[0]
    assert torch.equal(y, clone_y)
    y.square().sum().backward()
    clone_y.square().sum().backward()
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert p.data_ptr() != q.data_ptr() and p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad)
