"""The benchmark command runs and reports consistent numbers (no timing assertions: machines are noisy)."""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from expert_parallel.apps.bench import Variant, _interleaved, fitted_exponent, peak_bytes
from tests.procs import run

GLIBC = platform.libc_ver()[0] == "glibc"

SMALL = ["--d-model", "32", "--d-ff", "64", "--repeats", "2", "--warmup", "1"]


def test_bench_command_writes_medians_ratios_and_peaks(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    out = run([sys.executable, "-m", "expert_parallel", "bench", "--tokens", "128", *SMALL,
               "--profile", "--json", str(out_json)], timeout=300, env={"DS_ACCELERATOR": "cpu"})
    assert "ours" in out and "floor" in out
    point = json.loads(out_json.read_text())["points"][0]
    medians, peaks = point["median_s"], point["peak_bytes"]
    assert {"ours", "floor-loop", "floor-bmm", "floor", "deepspeed"} <= set(medians)
    assert all(v > 0 for v in medians.values()) and all(v > 0 for v in peaks.values())
    assert point["floor_is"] in ("floor-loop", "floor-bmm")
    assert {"ours_over_floor", "ours_over_deepspeed", "ours_peak_over_floor"} <= set(point)
    assert point["profile_shares"]["expert GEMMs"] > 0
    if GLIBC:
        assert json.loads(out_json.read_text())["malloc"] == "freed memory kept"


def test_bench_compile_puts_compiled_beside_eager(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    out = run([sys.executable, "-m", "expert_parallel", "bench", "--tokens", "128", *SMALL, "--no-deepspeed",
               "--compile", "--capacity-factor", "none", "--json", str(out_json)], timeout=300)
    point = json.loads(out_json.read_text())["points"][0]
    assert {"ours", "ours-compiled"} <= set(point["median_s"]) and point["median_s"]["ours-compiled"] > 0
    ratio = point["median_s"]["ours-compiled"] / point["median_s"]["ours"]
    assert point["compiled_over_eager"] == ratio and f"compiled / eager = {ratio:.2f}" in out


def test_bench_sweeps_write_points_and_a_plot(tmp_path: Path) -> None:
    out_json, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    run([sys.executable, "-m", "expert_parallel", "bench", *SMALL, "--no-deepspeed", "--sweep", "experts",
         "--values", "8,16,32", "--tokens", "64", "--json", str(out_json), "--plot", str(plot),
         "--default-malloc"], timeout=300)
    result = json.loads(out_json.read_text())
    assert result["malloc"] == "default"
    points = result["points"]
    # fine-grained experts at fixed active compute: E·F and K·F held
    shapes = [(p["num_experts"], p["d_ff"], p["top_k"]) for p in points]
    assert shapes == [(8, 64, 2), (16, 32, 4), (32, 16, 8)]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SLEEPS = {"short": 0.02, "long": 0.06}


def test_interleaved_timing_measures_known_durations_in_rotated_order() -> None:
    """The instrument behind every median: steps of known length (sleeps) are timed at least that
    long and in the right order, warm-up runs are dropped, and the order rotates every repeat."""
    calls: list[str] = []

    def variant(name: str) -> Variant:
        return Variant(lambda: (calls.append(name), time.sleep(SLEEPS[name]))[0], [])

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        times = _interleaved({n: variant(n) for n in SLEEPS}, warmup=1, repeats=3,
                             device=torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert calls == ["short", "long", "long", "short", "short", "long", "long", "short"]
    medians = {n: statistics.median(ts) for n, ts in times.items()}
    assert all(len(ts) == 3 for ts in times.values())
    for name, seconds in SLEEPS.items():
        assert seconds <= medians[name] < seconds + 0.5, medians
    assert medians["long"] > medians["short"], medians


def test_fitted_exponent_recovers_a_power_law() -> None:
    points = [{"tokens": t, "median_s": {"ours": 3e-6 * t**1.5}} for t in (1024, 2048, 4096, 8192)]
    assert math.isclose(fitted_exponent(points, "ours"), 1.5, rel_tol=1e-9)


def test_peak_bytes_counts_what_a_step_allocates() -> None:
    def step() -> None:
        a = torch.ones(1024, 1024)  # 4 MiB alive ...
        b = a * 2  # ... plus 4 MiB at the peak
        del a, b
    cpu = torch.device("cpu")
    assert 8 * 2**20 <= peak_bytes(step, cpu) < 9 * 2**20
    kept: list[torch.Tensor] = []
    peak_bytes(lambda: kept.append(torch.ones(1024, 1024)), cpu)  # allocated in one profile ...
    kept.clear()  # ... and freed outside it: the next measurement must not count it
    assert 8 * 2**20 <= peak_bytes(step, cpu) < 9 * 2**20


def test_overlap_probe_under_torchrun(tmp_path: Path) -> None:
    out_json = tmp_path / "probe.json"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "expert_parallel", "bench", "--overlap-probe", "--tokens", "256", *SMALL,
         "--json", str(out_json)], timeout=300, env={"OMP_NUM_THREADS": "1"})
    result = json.loads(out_json.read_text())
    assert result["ep_size"] == 2 and min(result["median_s"][n] for n in ("gemm", "exchange", "both")) > 0
    assert math.isfinite(result["hidden_fraction"])


FAULTS = """
import resource, sys, torch
from expert_parallel.apps.bench import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)  # 64 MiB, written then freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_keep_freed_memory_stops_page_faults_on_reallocation() -> None:
    """glibc maps a 64 MiB block afresh every time (16k page faults); with freed memory kept, the
    fourth allocation reuses the heap's pages. Up to five processes: in some (2 of 7 in one series
    here) the fourth allocation still faulted every page, glibc having mapped the block anyway; the
    cause is not pinned down (where the address-space layout put other mappings is the suspect)."""
    default = int(run([sys.executable, "-c", FAULTS, "default"], timeout=120).split()[-1])
    kept = []
    for _ in range(5):
        kept.append(int(run([sys.executable, "-c", FAULTS, "keep"], timeout=120).split()[-1]))
        if kept[-1] < 100:
            break
    assert default > 10_000 and min(kept) < 100, (default, kept)


def test_command_ends_its_process_group() -> None:
    """The command destroys its process group itself; left to interpreter teardown, gloo's threads
    sometimes aborted the overlap probe with SIGABRT after it had printed its result."""
    code = ("import torch.distributed as dist; from expert_parallel.apps.cli import main; "
            "main(['bench', '--overlap-probe', '--tokens', '64', '--d-model', '32', '--d-ff', '64', "
            "'--repeats', '2', '--warmup', '1']); print('initialized after:', dist.is_initialized())")
    assert "initialized after: False" in run([sys.executable, "-c", code], timeout=120)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_flops_match_torch_flop_counter(activation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FLOPs behind the TFLOP/s column, against torch's own count of a forward+backward of the
    experts on T·K rows (segment path: the counter knows torch.mm)."""
    from torch.utils.flop_counter import FlopCounterMode

    from expert_parallel import MoEConfig
    from expert_parallel.apps.bench import expert_flops
    from expert_parallel.ops import experts as experts_module
    monkeypatch.setattr(experts_module, "_can_use_cpu_grouped_mm", lambda *_: False)
    cfg = MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=2, activation=activation)
    tokens = 40
    experts = experts_module.GroupedExperts(cfg, base_seed=0)
    x = torch.randn(tokens * cfg.top_k, cfg.d_model, requires_grad=True)
    counts = torch.tensor([30, 10, 25, 15])
    with FlopCounterMode(display=False) as counter:
        experts(x, counts).sum().backward()
    assert counter.get_total_flops() == expert_flops(cfg, tokens)


def test_bench_runs_expert_parallel_under_torchrun(tmp_path: Path) -> None:
    """Two ranks: the replicas start equal (one seed for the model, one per rank for the tokens)."""
    out_json = tmp_path / "bench.json"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "expert_parallel", "bench", "--tokens", "128", *SMALL, "--no-deepspeed",
         "--json", str(out_json)], timeout=300, env={"OMP_NUM_THREADS": "1"})
    result = json.loads(out_json.read_text())
    assert result["ep_size"] == 2 and result["points"][0]["median_s"]["ours"] > 0


def test_compose_command_reports_bytes_times_and_reduction_peaks(tmp_path: Path) -> None:
    """expert-parallel compose at EP 2: fully_shard holds half the dense bytes of the plain model
    (2 ranks) and the same expert bytes (dp 1); DDP holds what the plain model holds; buckets take
    less peak memory in sync_gradients than one flat buffer."""
    out_json = tmp_path / "compose.json"
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "expert_parallel", "compose", "--repeats", "1", "--batch-size", "4", "--seq-len", "32",
               "--d-model", "64", "--n-layers", "1", "--json", str(out_json)], timeout=300)
    assert "fully_shard" in out
    result = json.loads(out_json.read_text())
    held = {form: {kind: sum(parts.values()) for kind, parts in kinds.items()}
            for form, kinds in result["bytes"].items()}
    plain, sharded = held["sync_gradients"], held["fully_shard"]
    assert abs(sharded["dense"] / plain["dense"] - 0.5) < 0.05, held
    assert sharded["expert"] == plain["expert"] and held["data_parallel"] == plain, held
    assert all(result["median_s"][form] > 0 for form in result["median_s"])
    peaks = result["sync_gradients_peak_bytes"]
    assert peaks["256 KiB buckets"] < peaks["one flat buffer"] <= 1.1 * peaks["gradients"], peaks
