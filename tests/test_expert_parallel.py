"""Expert parallelism on real gloo process groups under torchrun: equal to the single-device reference.

Each layout runs every case of tests/workers/ep_equivalence.py (top-k K=1/2 with drops, "probs",
dropless, noisy top-k in eval, groups, expert choice, soft, uneven and empty ranks, an idle rank) and
20 AdamW steps of a two-layer model, checking outputs, input gradients, aux, expert counts, every
parameter gradient after sync_gradients, grad norms and the communication report.
"""

from __future__ import annotations

import sys

import pytest
import torch

from expert_parallel.comm.distributed import detect_launcher
from expert_parallel.ops.experts import segment_order
from tests.procs import WORKERS, run, torchrun


@pytest.mark.parametrize("world, ep_size", [(2, 2), (4, 4), (4, 2), (2, 1)],
                         ids=["ep2", "ep4", "ep2xdp2", "ep1xdp2"])
def test_expert_parallel_equals_single_device(world: int, ep_size: int) -> None:
    out = torchrun(world, "ep_equivalence.py", "--ep-size", str(ep_size))
    assert "ALL OK 21 under torchrun" in out, out[-3000:]


@pytest.mark.parametrize("world, ep_size, per_node, extra", [(4, 4, 2, ["--random", "6", "--seed", "5"]),
                                                          (4, 2, 1, []), (4, 4, 4, ["--cases", "soft"])],
                         ids=["2nodes_x2", "ep2xdp2_1pernode", "one_node"])
def test_hierarchical_exchange_equals_single_device_and_flat(world: int, ep_size: int, per_node: int,
                                                             extra: list[str]) -> None:
    """Every case (and seeded random ones) with exchange="hierarchical": equal to the reference (output,
    gradients, aux, 20 training steps) and to the flat exchange, with no more bytes crossing nodes."""
    out = torchrun(world, "ep_equivalence.py", "--ep-size", str(ep_size), "--exchange", "hierarchical",
                   "--ranks-per-node", str(per_node), *extra)
    assert "ALL OK" in out and " under torchrun" in out, out[-3000:]


def test_single_process_mode_and_r1_exchange() -> None:
    out = run([sys.executable, str(WORKERS / "single_process.py")], timeout=300)
    assert "ALL OK" in out, out[-3000:]


def test_detect_launcher() -> None:
    assert detect_launcher({}) == "none"
    assert detect_launcher({"TORCHELASTIC_RUN_ID": "x", "RANK": "0"}) == "torchrun"
    assert detect_launcher({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}) == "torchrun"


def test_segment_order() -> None:
    # chunks from source 0: experts (a: 2 rows, b: 1 row); source 1: (a: 0, b: 3)
    sizes = torch.tensor([[2, 1], [0, 3]])
    received = torch.tensor([0, 1, 2, 3, 4, 5])  # a0 a0 b0 b1 b1 b1
    assert received[segment_order(sizes, 6)].tolist() == [0, 1, 2, 3, 4, 5]
    sizes = torch.tensor([[1, 2], [2, 1]])
    received = torch.tensor([10, 20, 21, 30, 31, 40])  # a0 | b0 b0 | a1 a1 | b1
    assert received[segment_order(sizes, 6)].tolist() == [10, 30, 31, 20, 21, 40]
