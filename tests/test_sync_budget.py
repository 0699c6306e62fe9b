"""The host-sync budget of one MoE forward and backward (tests/workers/sync_budget.py counts tensor
reads on the host and data-dependent-shape operators; see docs/architecture.md, "Host syncs")."""

from __future__ import annotations

import json
import sys

import pytest

from tests.procs import WORKERS, run, torchrun

# What each forward may still do, by exchange: an exchange reads the split-size table once (tolist),
# which also sizes the kept rows of a capacity-bounded plan and the hierarchical exchange's unique
# (node, token) rows; one process reads nothing where the expert GEMMs take device offsets (CPU
# grouped_mm here; a capacity plan is padded, its dropped rows go to a discarded row). No backward
# syncs anywhere.
ALLOWED = {
    "one process": {"capacity": [], "other": []},
    "flat": {"capacity": ["tolist"], "other": ["tolist"]},
    "hierarchical": {"capacity": ["tolist"], "other": ["tolist"]},
}


def check(out: str, mode: str) -> int:
    assert "DONE" in out, out[-3000:]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"case"')]
    for row in rows:
        kind = "capacity" if "capacity" in row["case"] else "other"
        allowed = ALLOWED["flat" if row["case"].startswith("soft/") and mode != "one process" else mode][kind]
        assert sorted(row["forward"]) == sorted(allowed), row  # fewer is progress: tighten the table
        assert row["backward"] == [], row
    return len(rows)


def test_one_process_budget() -> None:
    out = run([sys.executable, str(WORKERS / "sync_budget.py")], timeout=120)
    assert check(out, "one process") == 6


@pytest.mark.parametrize("exchange", ["flat", "hierarchical"])
def test_expert_parallel_budget(exchange: str) -> None:
    out = torchrun(2, "sync_budget.py", "--ep-size", "2", "--exchange", exchange, timeout=180)
    assert check(out, exchange) == 6
