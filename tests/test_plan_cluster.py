"""The cluster cost model (expert-parallel plan-cluster) against a simulation of uniform routing."""

from __future__ import annotations

import pytest
import torch

from expert_parallel.apps import plan_cluster as pc
from expert_parallel.apps.cli import main


def simulated_rows(nodes: int, per_node: int, experts: int, k: int, tokens: int, limited: int | None) -> dict:
    """Rows one GPU (node 0, GPU 0) sends in one dispatch, counted on sampled uniform routing."""
    gen = torch.Generator().manual_seed(0)
    per_expert_node = experts // nodes
    if limited is None:
        idx = torch.rand(tokens, experts, generator=gen).topk(k, dim=1).indices
    else:  # M random nodes per token, then K distinct experts among theirs
        chosen = torch.rand(tokens, nodes, generator=gen).topk(limited, dim=1).indices
        mask = torch.zeros(tokens, experts, dtype=torch.bool)
        for j in range(limited):
            first = chosen[:, j] * per_expert_node
            for x in range(per_expert_node):
                mask[torch.arange(tokens), first + x] = True
        idx = torch.where(mask, torch.rand(tokens, experts, generator=gen), -1.0).topk(k, dim=1).indices
    node = idx // per_expert_node
    gpu = idx // (experts // (nodes * per_node))
    remote_nodes = sum(int(((node == v).any(1)).sum()) for v in range(1, nodes))
    return {"flat_inter": int((node != 0).sum()), "flat_self": int((gpu == 0).sum()),
            "hier_inter": remote_nodes}


@pytest.mark.parametrize("nodes, per_node, experts, k, limited", [(2, 2, 64, 8, None), (8, 8, 256, 8, None),
                                                                  (4, 2, 32, 4, 2), (8, 4, 64, 6, 3)])
def test_model_matches_sampled_routing(nodes: int, per_node: int, experts: int, k: int,
                                       limited: int | None) -> None:
    tokens = 20000
    sim = simulated_rows(nodes, per_node, experts, k, tokens, limited)
    cluster = pc.Cluster(nodes, per_node, 100.0, 10.0)
    work = pc.Workload(64, 32, experts, k, tokens, element_bytes=1, limited_nodes=limited or 1)
    row = 64 * 4  # the model counts 4 passes of D one-byte elements
    flat = pc.traffic(cluster, work, "flat")
    assert flat["inter"] / row == pytest.approx(sim["flat_inter"], rel=0.03)
    assert flat["self"] / row == pytest.approx(sim["flat_self"], rel=0.1)
    variant = "hierarchical" if limited is None else "node_limited"
    meta = tokens * k * (nodes - 1) / nodes * 16
    rows = (pc.traffic(cluster, work, variant)["inter"] - meta) / row
    assert rows == pytest.approx(sim["hier_inter"], rel=0.03)


def test_time_model_and_command(capsys: pytest.CaptureFixture[str]) -> None:
    cluster = pc.Cluster(2, 2, 1.0, 0.025, "node", round_latency_s=0.0)
    work = pc.Workload(512, 256, 64, 8, 256, element_bytes=4)
    flat, hier = (pc.step_time(cluster, work, v, 0.1) for v in ("flat", "hierarchical"))
    # seconds = bytes through the node's one link / its rate (+ a fixed cost per round)
    assert flat["inter_s"] == pytest.approx(pc.traffic(cluster, work, "flat")["inter"] * 2 / 0.025e9)
    slow = pc.step_time(pc.Cluster(2, 2, 1.0, 0.025, "node", round_latency_s=0.01), work, "flat", 0.1)
    assert slow["inter_s"] == pytest.approx(flat["inter_s"] + 5 * 0.01)
    assert hier["step_s"] < flat["step_s"] and flat["step_s"] == pytest.approx(0.1 + flat["comm_s"])
    main(["plan-cluster", "--nodes", "4", "--gpus-per-node", "2", "--experts", "64"])
    out = capsys.readouterr().out
    assert "hierarchical" in out and "node_limited (M=4)" in out
    assert main(["plan-cluster", "--experts", "60"]) == 2  # bad input: one line, status 2
    assert "expert-parallel plan-cluster: error: --experts 60 is not a multiple" in capsys.readouterr().err
