"""The benchmark command runs and reports consistent numbers (no timing assertions: machines are noisy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.procs import run


def test_bench_command_writes_medians_and_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    out = run([sys.executable, "-m", "expert_parallel.cli", "bench", "--tokens", "128", "--d-model", "32",
               "--d-ff", "64", "--repeats", "2", "--warmup", "1", "--no-deepspeed", "--json", str(out_json)],
              timeout=300)
    assert "ours" in out and "floor" in out
    result = json.loads(out_json.read_text())
    medians = result["median_s"]
    assert set(medians) == {"ours", "floor"} and all(v > 0 for v in medians.values())
    assert abs(result["ours_over_floor"] - medians["ours"] / medians["floor"]) < 1e-9
