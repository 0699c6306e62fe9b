"""The routing plan: which token goes to which expert slot with which weight. Math only.

Every router is turned into a :class:`RoutingPlan`, so one dispatcher serves them all. Rows of the plan
(routed token copies that are kept) are sorted by (expert, group, slot): the rows of expert e form one
contiguous block, and inside it group g's rows sit at slots 0, 1, ... — exactly the layout of a
[E, G, C] capacity buffer, minus its empty slots. No one-hot [S, E, C] tensor is ever built: slots come
from one stable sort and a segment offset, O(N log N) in the routed copies N whatever E and C are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class SoftMix:
    """Soft MoE weights: rows are slot mixes of the group's tokens instead of token copies.

    Attributes:
        dispatch_GSJ: softmax over tokens; slot j of group g = sum_s dispatch[g, s, j] * x_s.
        combine_GSJ: softmax over slots; y_s = sum_j combine[g, s, j] * out_j.
    """

    dispatch_GSJ: Tensor
    combine_GSJ: Tensor


@dataclass(frozen=True)
class RoutingPlan:
    """Kept routed rows sorted by (expert, group, slot); produced by a router, consumed by dispatch.

    Attributes:
        num_experts: E.
        num_groups: G.
        tokens_per_group: S.
        capacity: C, slots per expert per group, or None (dropless).
        token_N: source token of each row (index into x_TD).
        expert_N: expert of each row (non-decreasing).
        group_N: routing group of each row.
        slot_N: position of the row inside its (expert, group) block, < C.
        gate_N: combine weight of each row (router_dtype, differentiable).
        counts_E: int64 [E], kept rows per expert.
        selected_E: int64 [E], assignments per expert before drops (token choice: the tokens that
            selected e; expert choice and soft: counts_E).
        dropped_fraction: float scalar tensor: dropped assignments / assignments (token choice),
            tokens taken by no expert / tokens (expert choice), 0 (soft).
        soft: the slot mixing weights of Soft MoE; None for the index-based routers, whose rows
            are copies of token_N weighted by gate_N (token_N and gate_N are empty for soft).
        padded: the rows are every assignment, the kept ones first (in the order above) and the
            dropped ones after them: the kept rows are the first ``counts_E.sum()``, a number on the
            device. An expert-parallel exchange reads it with its split sizes (its one host read)
            and calls :meth:`truncated`; sizing the kept rows here would be a second read.
    """

    num_experts: int
    num_groups: int
    tokens_per_group: int
    capacity: int | None
    token_N: Tensor
    expert_N: Tensor
    group_N: Tensor
    slot_N: Tensor
    gate_N: Tensor
    counts_E: Tensor
    selected_E: Tensor
    dropped_fraction: Tensor
    soft: SoftMix | None = None
    padded: bool = False

    @property
    def num_kept(self) -> int:
        """Rows of the plan: kept routed copies (token and expert choice) or slots (soft).

        Raises:
            ValueError: the plan is padded (its kept rows are not counted on the host yet).
        """
        if self.padded:
            raise ValueError("num_kept of a padded plan: truncate it to its kept rows first")
        return int(self.expert_N.shape[0])

    def bounded(self) -> RoutingPlan:
        """A padded plan cut to its first E·G·C rows (a number known on the host), which hold every
        kept row: at most as many rows as a capacity buffer of E·G·C slots, whatever the drops."""
        if not self.padded or self.capacity is None:
            return self
        n = min(self.token_N.shape[0], self.num_experts * self.num_groups * self.capacity)
        return replace(self, token_N=self.token_N[:n], expert_N=self.expert_N[:n], group_N=self.group_N[:n],
                       slot_N=self.slot_N[:n], gate_N=self.gate_N[:n])

    def truncated(self, num_kept: int) -> RoutingPlan:
        """A padded plan cut to its first ``num_kept`` rows (``counts_E.sum()``, read on the host)."""
        if not self.padded:
            return self
        n = num_kept
        return replace(self, token_N=self.token_N[:n], expert_N=self.expert_N[:n], group_N=self.group_N[:n],
                       slot_N=self.slot_N[:n], gate_N=self.gate_N[:n], padded=False)


def count_values(index_M: Tensor, size: int) -> Tensor:
    """int64 [size]: how often each value in [0, size) occurs in ``index_M``.

    ``torch.bincount(index_M, minlength=size)`` with a fixed output shape: bincount's shape depends
    on the largest value, which makes it a data-dependent operator (a graph break under
    torch.compile, two device syncs on CUDA).
    """
    return torch.zeros(size, dtype=torch.int64, device=index_M.device).scatter_add_(
        0, index_M, torch.ones_like(index_M, dtype=torch.int64))


def _priority_order(idx_GSK: Tensor, gates_GSK: Tensor, probs_GSE: Tensor,
                    drop_policy: str) -> Tensor:
    """[G, S*K] flat (s*K + k) indices of each group's assignments, highest priority first.

    "position": all first choices in token order, then all second choices, ...;
    "probs": highest router probability first (ties in position order).
    """
    G, S, K = idx_GSK.shape
    s_S, k_K = torch.arange(S, device=idx_GSK.device), torch.arange(K, device=idx_GSK.device)
    position_M = (s_S[None, :] * K + k_K[:, None]).reshape(-1)  # [K*S]: k-major, then token
    order_GM = position_M.expand(G, -1)
    if drop_policy == "probs":
        chosen_GSK = torch.gather(probs_GSE, 2, idx_GSK)
        chosen_GM = chosen_GSK.reshape(G, S * K).gather(1, order_GM)
        by_prob_GM = torch.sort(chosen_GM, dim=1, descending=True, stable=True).indices
        order_GM = order_GM.gather(1, by_prob_GM)
    return order_GM


def slot_positions(expert_M: Tensor, group_M: Tensor, num_experts: int,
                   num_groups: int) -> tuple[Tensor, Tensor]:
    """Sorts assignments (given in priority order) by (expert, group) and numbers them in each block.

    Returns:
        order_M: permutation putting assignments in (expert, group, priority) order.
        slot_M: each sorted assignment's position inside its (expert, group) block.
    """
    key_M = expert_M * num_groups + group_M
    key_sorted_M, order_M = torch.sort(key_M, stable=True)
    block_counts = count_values(key_M, num_experts * num_groups)
    block_start = torch.cumsum(block_counts, 0) - block_counts
    slot_M = torch.arange(key_M.shape[0], device=key_M.device) - block_start[key_sorted_M]
    return order_M, slot_M


def token_choice_plan(idx_GSK: Tensor, gates_GSK: Tensor, probs_GSE: Tensor,
                      capacity: int | None, drop_policy: str, pad_drops: bool = False) -> RoutingPlan:
    """Plan for top-k routing: each token's K choices, slots by drop_policy, drops beyond C.

    Args:
        idx_GSK: chosen experts; gates_GSK: their gate weights; probs_GSE: router probabilities.
        capacity: C, or None for dropless.
        drop_policy: "position" or "probs".
        pad_drops: with a capacity, keep the dropped assignments at the end of a padded plan
            (shapes that do not depend on the data, no host read) instead of removing them.
    """
    G, S, K = idx_GSK.shape
    E = probs_GSE.shape[-1]
    device = idx_GSK.device
    # 1. Every group's assignments in priority order, flattened over groups.
    order_GM = _priority_order(idx_GSK, gates_GSK, probs_GSE, drop_policy)
    flat_GM = order_GM + torch.arange(G, device=device)[:, None] * (S * K)
    flat_M = flat_GM.reshape(-1)
    expert_M = idx_GSK.reshape(-1)[flat_M]
    group_M = flat_M // (S * K)
    # 2. Sort by (expert, group), stable so priority order survives inside each block.
    order_M, slot_M = slot_positions(expert_M, group_M, E, G)
    sorted_M = flat_M[order_M]
    # 3. Keep what fits.  NOTE: host-device sync (one nonzero sizes the kept rows); the only one of
    # the plan, and none in dropless mode or with pad_drops.
    padded = capacity is not None and pad_drops
    if capacity is not None and pad_drops:
        dropped_M = (slot_M >= capacity).to(torch.uint8)
        kept_first = torch.sort(dropped_M, stable=True).indices  # kept rows first, order kept
        sorted_M, slot_M = sorted_M[kept_first], slot_M[kept_first]
        expert_N = idx_GSK.reshape(-1)[sorted_M]
        counts_E = torch.zeros(E, dtype=torch.int64, device=device).scatter_add_(
            0, expert_N, 1 - dropped_M[kept_first].long())
    else:
        if capacity is not None:
            kept_N = torch.nonzero(slot_M < capacity).squeeze(1)
            sorted_M, slot_M = sorted_M.index_select(0, kept_N), slot_M.index_select(0, kept_N)
        expert_N = idx_GSK.reshape(-1)[sorted_M]
        counts_E = count_values(expert_N, E)
    return RoutingPlan(
        num_experts=E, num_groups=G, tokens_per_group=S, capacity=capacity,
        token_N=sorted_M // K, expert_N=expert_N, group_N=sorted_M // (S * K), slot_N=slot_M,
        gate_N=gates_GSK.reshape(-1)[sorted_M], counts_E=counts_E,
        selected_E=count_values(idx_GSK.reshape(-1), E),
        dropped_fraction=1.0 - counts_E.sum() / max(G * S * K, 1), padded=padded)


def _full_slots(E: int, G: int, C: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """expert_N, group_N, slot_N of E·G·C rows that fill every slot, in (expert, group, slot) order."""
    shape = (E, G, C)
    expert_N = torch.arange(E, device=device)[:, None, None].expand(shape).reshape(-1)
    group_N = torch.arange(G, device=device)[None, :, None].expand(shape).reshape(-1)
    slot_N = torch.arange(C, device=device)[None, None, :].expand(shape).reshape(-1)
    return expert_N, group_N, slot_N


def expert_choice_plan(tokens_GEC: Tensor, weights_GEC: Tensor, tokens_per_group: int) -> RoutingPlan:
    """Plan for expert-choice routing: expert e's slot c of group g holds token tokens_GEC[g, e, c].

    Every slot is full; a token may be taken by several experts or by none (counted as dropped).
    """
    G, E, C = tokens_GEC.shape
    S = tokens_per_group
    expert_N, group_N, slot_N = _full_slots(E, G, C, tokens_GEC.device)
    token_N = (tokens_GEC + torch.arange(G, device=tokens_GEC.device)[:, None, None] * S)
    token_N = token_N.permute(1, 0, 2).reshape(-1)
    taken_T = count_values(token_N, G * S) > 0
    return RoutingPlan(
        num_experts=E, num_groups=G, tokens_per_group=S, capacity=C, token_N=token_N,
        expert_N=expert_N, group_N=group_N, slot_N=slot_N,
        gate_N=weights_GEC.permute(1, 0, 2).reshape(-1),
        counts_E=torch.full((E,), G * C, dtype=torch.int64, device=tokens_GEC.device),
        selected_E=torch.full((E,), G * C, dtype=torch.int64, device=tokens_GEC.device),
        dropped_fraction=1.0 - taken_T.float().mean())


def soft_plan(dispatch_GSJ: Tensor, combine_GSJ: Tensor, num_experts: int) -> RoutingPlan:
    """Plan for Soft MoE: J = E·P slots per group, P = slots per expert, every slot full."""
    G, S, J = dispatch_GSJ.shape
    P = J // num_experts
    expert_N, group_N, slot_N = _full_slots(num_experts, G, P, dispatch_GSJ.device)
    empty = torch.empty(0, dtype=torch.int64, device=dispatch_GSJ.device)
    return RoutingPlan(
        num_experts=num_experts, num_groups=G, tokens_per_group=S, capacity=P, token_N=empty,
        expert_N=expert_N, group_N=group_N, slot_N=slot_N, gate_N=dispatch_GSJ.new_empty(0),
        counts_E=torch.full((num_experts,), G * P, dtype=torch.int64, device=dispatch_GSJ.device),
        selected_E=torch.full((num_experts,), G * P, dtype=torch.int64, device=dispatch_GSJ.device),
        dropped_fraction=torch.zeros((), device=dispatch_GSJ.device), soft=SoftMix(dispatch_GSJ, combine_GSJ))
