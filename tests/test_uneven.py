"""Ranks that do different things: the right numbers or a named error on every rank, never a hang.

The scenarios run in tests/workers/uneven.py (its docstring lists them); each prints "OK <scenario>"
on every rank once its numbers were checked against the single-device reference (lines of two
ranks may run together in the job's output: counted, not anchored).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import expert_parallel as ep
from tests.procs import torchrun

LOCKSTEP_FREE = ["groups", "layer_mismatch", "join_eval", "join_refuses", "join_mixed", "misuse",
                 "join_edges"]


@pytest.mark.parametrize("world, scenarios", [
    (2, LOCKSTEP_FREE),
    (4, ["groups", "join_eval", "join_mixed", "join_edges"]),
])
def test_ranks_running_different_forwards_get_the_lockstep_numbers_or_a_named_error(
        world: int, scenarios: list[str]) -> None:
    out = torchrun(world, "uneven.py", *scenarios, timeout=240)
    for scenario in scenarios:
        assert len(re.findall(rf"OK {scenario}(?![:_a-z])", out)) == world, (scenario, out[-4000:])


def test_a_users_collective_never_pairs_with_the_librarys() -> None:
    """Rank 0 runs one MoE forward more, rank 1 calls dist.all_reduce on the default group: rank 0
    gets a CollectiveError naming the cause and ep.join within the timeout (checked in the worker),
    rank 1's all_reduce times out: no wrong sum is printed."""
    out = torchrun(2, "uneven.py", "user_collective", timeout=120)
    assert len(re.findall(r"OK user_collective(?![:_a-z])", out)) == 2, out[-3000:]


def test_a_none_group_before_init_is_a_value_error_in_a_launched_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ep_group=dist.group.WORLD`` read before init_process_group is None: in a job of several
    processes it is refused, not a silent layer holding every expert; in a plain process, and with
    no ep_group at all, it is the one-device layer."""
    assert not dist.is_initialized()
    cfg = ep.MoEConfig(d_model=8, d_ff=16, num_experts=4)
    assert ep.MoE(cfg, ep_group=dist.group.WORLD).ep_size == 1  # python script.py: one device
    launched = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x"}
    for name, value in launched.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"before torch\.distributed is initialised"):
        ep.MoE(cfg, ep_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="ProcessGroup"):
        ep.MoE(cfg, ep_group="world")  # type: ignore[arg-type]
    assert ep.MoE(cfg).ep_size == 1  # no ep_group: the one-device layer, asked for


def test_join_without_peers_changes_nothing() -> None:
    torch.manual_seed(0)
    moe = ep.MoE(ep.MoEConfig(d_model=8, d_ff=16, num_experts=4)).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        want, _ = moe(x)
        with ep.join(moe):
            got, _ = moe(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
