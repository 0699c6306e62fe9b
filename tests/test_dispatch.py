"""Plan, dispatch and combine: slots respect capacity; the round trip is the identity."""

from __future__ import annotations

import pytest
import torch

from expert_parallel.ops.dispatch import LocalDispatcher
from expert_parallel.ops.plan import token_choice_plan
from expert_parallel.ops.routing import topk_from_logits
from tests.oracle import oracle_kept_assignments


def random_plan(G: int, S: int, E: int, K: int, capacity: int | None, policy: str = "position",
                unit_gates: bool = False):
    logits = torch.randn(G, S, E, requires_grad=True)
    gates, idx, probs = topk_from_logits(logits, K, normalize=True)
    if unit_gates:
        gates = torch.ones_like(gates)
    return token_choice_plan(idx, gates, probs, capacity, policy), idx, logits.detach()


@pytest.mark.parametrize("capacity", [None, 1, 3, 100])
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_plan_invariants(capacity: int | None, policy: str) -> None:
    torch.manual_seed(0)
    G, S, E, K = 3, 16, 5, 2
    plan, idx, logits = random_plan(G, S, E, K, capacity, policy)
    # sorted by (expert, group, slot), slots numbered 0.. inside each block, never beyond C
    key = (plan.expert_N * G + plan.group_N) * (S * K) + plan.slot_N
    assert torch.all(key[1:] > key[:-1])
    for e in range(E):
        for g in range(G):
            block = plan.slot_N[(plan.expert_N == e) & (plan.group_N == g)]
            assert torch.equal(block, torch.arange(block.numel()))
            if capacity is not None:
                assert block.numel() <= capacity
    # the kept rows and the per-expert counts are the loop oracle's, assignment for assignment
    kept, counts = oracle_kept_assignments(idx, torch.softmax(logits, -1), capacity, policy)
    pairs = list(zip(plan.token_N.tolist(), plan.expert_N.tolist(), strict=True))
    assert len(pairs) == len(set(pairs)) and set(pairs) == kept
    assert plan.group_N.tolist() == [t // S for t in plan.token_N.tolist()]
    assert torch.equal(plan.counts_E, counts)


def test_dispatch_combine_round_trip_is_identity_with_gradient() -> None:
    """Dropless, K=1, unit gates: combine(dispatch(x)) == x and the gradient passes unchanged."""
    torch.manual_seed(1)
    T, D = 24, 6
    plan, _, _ = random_plan(2, T // 2, 4, 1, None, unit_gates=True)
    x = torch.randn(T, D, requires_grad=True)
    d = LocalDispatcher()
    dispatched = d.dispatch(x, plan)
    assert torch.equal(dispatched.counts_Re, plan.counts_E[None])
    y = d.combine(dispatched.x_nD, dispatched, T)
    assert torch.equal(y, x)
    w = torch.randn(T, D)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.equal(g, w)


def test_round_trip_with_k_copies_sums_k_times() -> None:
    torch.manual_seed(2)
    T, D, K = 12, 4, 3
    plan, _, _ = random_plan(1, T, 5, K, None, unit_gates=True)
    x = torch.randn(T, D)
    d = LocalDispatcher()
    dispatched = d.dispatch(x, plan)
    torch.testing.assert_close(d.combine(dispatched.x_nD, dispatched, T), K * x)


def test_dropped_tokens_get_zero() -> None:
    torch.manual_seed(3)
    T, D = 16, 4
    plan, _, _ = random_plan(1, T, 4, 1, 1, unit_gates=True)  # at most one token per expert
    x = torch.randn(T, D)
    d = LocalDispatcher()
    dispatched = d.dispatch(x, plan)
    y = d.combine(dispatched.x_nD, dispatched, T)
    kept = torch.zeros(T, dtype=torch.bool)
    kept[plan.token_N] = True
    assert plan.num_kept <= 4
    torch.testing.assert_close(y[kept], x[kept])
    assert torch.all(y[~kept] == 0)


def test_dedup_by_node_and_fan_out_oracle() -> None:
    """Copies deduplicated per (node, token), then fanned out by a proxy: every copy reads its own
    token's row, and the proxy's order is expert-major."""
    from expert_parallel.ops.nodes import dedup_by_node, fan_out
    torch.manual_seed(0)
    T, E, K, experts_per_node, nodes = 12, 8, 3, 4, 2
    plan, _, _ = random_plan(1, T, E, K, None)
    rows = dedup_by_node(plan.token_N, plan.expert_N, T, experts_per_node, nodes)
    pairs = sorted({(e // experts_per_node, t) for t, e in zip(plan.token_N.tolist(), plan.expert_N.tolist(),
                                                               strict=True)})
    n_unique = int(rows.count_V.sum())
    assert rows.token_U.shape[0] == plan.num_kept  # shape fixed by the copies, not by the data
    assert rows.token_U[:n_unique].tolist() == [t for _, t in pairs]  # one row per (node, token), node-major
    assert rows.count_V.tolist() == [sum(v == node for v, _ in pairs) for node in range(nodes)]
    start = [0, int(rows.count_V[0])]
    for (row, expert), token in zip(rows.meta_N2.tolist(), plan.token_N.tolist(), strict=True):  # own row
        assert rows.token_U[start[expert // experts_per_node] + row] == token
    assert rows.meta_N2[:, 1].tolist() == plan.expert_N.tolist()
    # a proxy that received node 1's block from two sources (the same block twice, here)
    node1 = plan.expert_N >= experts_per_node
    meta = rows.meta_N2[node1]
    n_rows = int(rows.count_V[1])
    fan = fan_out(torch.cat([meta, meta]), torch.tensor([int(node1.sum())] * 2), torch.tensor([n_rows] * 2))
    experts = torch.cat([meta, meta])[fan.order_H, 1]
    assert torch.all(experts[1:] >= experts[:-1])
    recv_tokens = torch.cat([rows.token_U[start[1]:n_unique], rows.token_U[start[1]:n_unique]])
    expected = torch.cat([plan.token_N[node1], plan.token_N[node1]])[fan.order_H]
    assert torch.equal(recv_tokens[fan.row_H], expected)


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_a_padded_plan_cut_to_its_kept_rows_is_the_plan(policy: str, capacity: int) -> None:
    """pad_drops: every assignment, the kept ones first, shapes independent of the data; cut at
    counts_E.sum() it equals the plan that drops with nonzero, field by field, and so does its
    per-node deduplication (dropped copies count for no node)."""
    from expert_parallel.ops.nodes import dedup_by_node
    torch.manual_seed(capacity)
    G, S, E, K = 2, 10, 4, 2
    logits = torch.randn(G, S, E)
    probs = logits.softmax(-1)
    gates, idx = probs.topk(K, dim=-1)
    plain = token_choice_plan(idx, gates, probs, capacity, policy)
    padded = token_choice_plan(idx, gates, probs, capacity, policy, pad_drops=True)
    assert padded.padded and padded.expert_N.shape[0] == G * S * K
    with pytest.raises(ValueError, match="padded"):
        _ = padded.num_kept
    cut = padded.truncated(int(padded.counts_E.sum()))
    bounded = padded.bounded()  # the one-process cut: a static E·G·C rows, every kept one in them
    assert bounded.padded and bounded.token_N.shape[0] == min(G * S * K, E * G * capacity)
    for name in ("token_N", "expert_N", "group_N", "slot_N", "gate_N", "counts_E", "selected_E",
                 "dropped_fraction"):
        assert torch.equal(getattr(cut, name), getattr(plain, name)), name
        assert torch.equal(getattr(bounded.truncated(plain.num_kept), name), getattr(plain, name)), name
    assert plain.num_kept < G * S * K  # something was dropped
    T, per_node, nodes = G * S, 2, 2
    want = dedup_by_node(plain.token_N, plain.expert_N, T, per_node, nodes)
    kept = torch.arange(G * S * K) < padded.counts_E.sum()
    got = dedup_by_node(padded.token_N, padded.expert_N, T, per_node, nodes, kept)
    n_unique = int(want.count_V.sum())
    assert torch.equal(got.count_V, want.count_V)
    assert torch.equal(got.token_U[:n_unique], want.token_U[:n_unique])
    assert torch.equal(got.meta_N2[:plain.num_kept], want.meta_N2)


def test_comm_report_link_classes() -> None:
    from expert_parallel.ops.dispatch import CommReport
    report = CommReport("dropless", (1, 2, 3, 4), (4, 3, 2, 1), 2, 4, rank=1, ranks_per_node=2,
                        meta_bytes=(0, 0, 12, 0))
    assert report.sent_bytes == (40, 40, 52, 40)
    assert report.bytes_by_class == {"self": 40, "intra": 40, "inter": 92}
    assert CommReport("capacity", (1, 1), (1, 1), 1, 4).bytes_by_class == {"self": 8, "intra": 8, "inter": 0}


@pytest.mark.parametrize("rows_dtype, gate_dtype", [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.float32),
                                                     (torch.float32, torch.bfloat16)])
def test_weighted_sum_rows_in_chunks_equals_the_plain_formula(monkeypatch: pytest.MonkeyPatch,
                                                              rows_dtype: torch.dtype,
                                                              gate_dtype: torch.dtype) -> None:
    """Every chunked path (chunks of 3 rows, so several per call) against index_add under autograd:
    output, row and gate gradients, in the wider dtype."""
    from expert_parallel.ops.dispatch import _WeightedIndexAdd, weighted_sum_rows
    for name in ("CHUNK", "BACKWARD_CHUNK", "WIDE_CHUNK"):
        monkeypatch.setattr(_WeightedIndexAdd, name, 3)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(11, 5, generator=g).to(rows_dtype).requires_grad_()
    gate = torch.rand(11, generator=g).to(gate_dtype).requires_grad_()
    token = torch.tensor([0, 3, 1, 3, 2, 0, 4, 4, 1, 2, 0])
    wide = torch.promote_types(rows_dtype, gate_dtype)
    out = weighted_sum_rows(y, gate, token, 6)
    y2, gate2 = y.detach().clone().requires_grad_(), gate.detach().clone().requires_grad_()
    want = torch.zeros(6, 5, dtype=wide).index_add(0, token, y2.to(wide) * gate2.to(wide)[:, None])
    assert out.dtype == wide
    torch.testing.assert_close(out, want)
    grad = torch.randn(6, 5, generator=g).to(wide)
    out.backward(grad)
    want.backward(grad)
    assert y.grad is not None and gate.grad is not None
    assert y.grad.dtype == rows_dtype and gate.grad.dtype == gate_dtype
    torch.testing.assert_close(y.grad, y2.grad)
    torch.testing.assert_close(gate.grad, gate2.grad)
