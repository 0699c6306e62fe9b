"""Dispatch and combine: tokens to per-expert rows and weighted expert outputs back to tokens.

A dispatcher turns ``x_TD`` and a :class:`RoutingPlan` into the rows this rank's experts must run
(``Dispatched``: rows sorted by local expert, their counts, and whatever combine needs), and turns the
expert outputs back into ``y_TD``. :class:`LocalDispatcher` is the R = 1 case (every expert local, no
communication); an expert-parallel dispatcher implements the same two methods with an all-to-all
exchange between the gather and the experts, and between the experts and the combine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .plan import RoutingPlan
from .precision import autocast_off


def link_class(src: int, dst: int, per_node: int) -> str:
    """"self" (a rank's copy to itself), "intra" (same node of ``per_node`` contiguous ranks) or
    "inter" (another node)."""
    if src == dst:
        return "self"
    return "intra" if src // per_node == dst // per_node else "inter"


@dataclass(frozen=True)
class CommReport:
    """Traffic of one MoE call on this rank, per peer of the expert-parallel group.

    Dispatch sends ``sent_rows[q]`` rows of D elements to peer q and receives ``recv_rows[q]`` rows
    from it; combine sends the received rows back. So over one call this rank sends, and receives,
    ``sent_rows[q] + recv_rows[q]`` rows to and from q. The entry for this rank itself is a local copy.
    The hierarchical exchange counts both of its stages (to proxies on other nodes, then inside the
    node), and ``meta_bytes`` adds the per-copy routing metadata it sends with the rows and, in its
    combine, the bytes by which the partial sums it sends back (fp32 for bf16 rows) exceed rows.

    Attributes:
        mode: "local" (every expert on this rank), "capacity" or "dropless".
        sent_rows: rows sent to each peer in dispatch ("local": the rows copied for the experts;
            with a padded one-process plan min(G·S·K, E·G·C), the dropped rows included).
        recv_rows: rows received from each peer in dispatch.
        row_elements: D, elements per row.
        element_size: bytes per element.
        control_bytes: bytes of per-expert counts in the count all-gather.
        rank: this rank's index in the expert-parallel group.
        ranks_per_node: P, ranks of the group per node (peer q is on node q // P); 0 = one node.
        exchange: "flat" or "hierarchical".
        meta_bytes: bytes of routing metadata sent to each peer in dispatch, plus the extra width
            of the hierarchical combine's partial sums (empty: none).
    """

    mode: str
    sent_rows: tuple[int, ...]
    recv_rows: tuple[int, ...]
    row_elements: int
    element_size: int
    control_bytes: int = 0
    rank: int = 0
    ranks_per_node: int = 0
    exchange: str = "flat"
    meta_bytes: tuple[int, ...] = ()

    @property
    def dispatch_elements(self) -> int:
        """Elements this rank sends in dispatch (rows · D, its local copy included)."""
        return sum(self.sent_rows) * self.row_elements

    @property
    def sent_bytes(self) -> tuple[int, ...]:
        """Bytes sent to each peer over the call (dispatch + combine; with ``meta_bytes``, what this
        rank sends: the hierarchical combine's wider partial sums are counted by their sender)."""
        row_bytes = self.row_elements * self.element_size
        meta = self.meta_bytes or (0,) * len(self.sent_rows)
        return tuple((s + r) * row_bytes + m
                     for s, r, m in zip(self.sent_rows, self.recv_rows, meta, strict=True))

    def link_class(self, peer: int) -> str:
        """"self" (a local copy), "intra" (a peer on this rank's node) or "inter" (another node)."""
        return link_class(self.rank, peer, self.ranks_per_node or len(self.sent_rows))

    @property
    def bytes_by_class(self) -> dict[str, int]:
        """Bytes this rank sends over the call, split into "self", "intra" and "inter" (node)."""
        out = dict.fromkeys(("self", "intra", "inter"), 0)
        for peer, sent in enumerate(self.sent_bytes):
            out[self.link_class(peer)] += sent
        return out


@dataclass(frozen=True)
class CallInfo:
    """Which MoE call a dispatch belongs to, for error messages and the opt-in debug checks.

    Attributes:
        layer: the layer's name (its qualified name in the model once ``ep.configure_debug`` ran).
        call: the layer's call number (1, 2, ...).
        check_splits: cross-check split sizes between ranks before every exchange (debug mode).
        layer_id: the layer's number among the expert-parallel layers on its ranks (1, 2, ... in
            construction order, the same on every rank; 0: unknown), sent with the counts.
        flags: NaN/Inf flags of this call's input (1) and router logits (2), an int64 scalar on the
            device, sent with the counts (``check_finite``); None: not checked.
        joined: the call runs inside ``ep.join``: its backward is refused.
    """

    layer: str = "MoE"
    call: int = 0
    check_splits: bool = False
    layer_id: int = 0
    flags: Tensor | None = None
    joined: bool = False


@dataclass(frozen=True)
class ExchangeState:
    """What an expert-parallel combine needs to send the expert outputs back.

    Attributes:
        send_rows: rows this rank sent to each rank of the group in dispatch ([R]).
        recv_rows: rows it received from each rank ([R]); combine sends these back.
        info: the call, for the combine's error messages and debug checks.
    """

    send_rows: list[int]
    recv_rows: list[int]
    info: CallInfo


@dataclass(frozen=True)
class Dispatched:
    """What dispatch hands to the experts and, through the caller, to combine.

    Attributes:
        x_nD: rows for this rank's experts, ordered (source rank, local expert): in one process
            one source (sorted by expert); under expert parallelism one block per source rank of
            the group, as received.
        counts_Re: int64 [R, e], rows per (source rank, local expert); R = 1 in one process.
        plan: the routing plan the rows came from.
        counts_E_global: int64 [E], kept rows per expert summed over the expert-parallel group.
        selected_E_global: int64 [E], assignments per expert before drops, summed over the
            expert-parallel group (for MaxVio).
        comm: the traffic report of this call.
        exchange: the split sizes of the exchange (None when nothing was exchanged).
        counts_host: counts_Re flattened on the host, where the dispatcher already copied them
            (the experts' segment loop then needs no device-to-host copy of its own).
        target_N: one process with a padded plan: the token each row's output goes to, and T
            (a row past the tokens, discarded) for the dropped rows, which the experts leave
            undefined; None otherwise.
    """

    x_nD: Tensor
    counts_Re: Tensor
    plan: RoutingPlan
    counts_E_global: Tensor
    selected_E_global: Tensor
    comm: CommReport
    exchange: ExchangeState | None = None
    counts_host: list[int] | None = None
    target_N: Tensor | None = None


class Dispatcher(Protocol):
    """Moves routed token copies to the experts that own them and the outputs back."""

    def dispatch(self, x_TD: Tensor, plan: RoutingPlan, info: CallInfo | None = None) -> Dispatched:
        """Rows of x for this rank's experts (``info``: the call, for error messages)."""
        ...

    def combine(self, y_nD: Tensor, dispatched: Dispatched, num_tokens: int) -> Tensor:
        """y_TD = sum over each token's kept rows of gate * expert output."""
        ...


def gather_rows(x_TD: Tensor, plan: RoutingPlan) -> Tensor:
    """x_ND: one row per kept routed copy (or soft slot), in plan order (expert, group, slot)."""
    if plan.soft is not None:
        return _soft_slots(x_TD, plan)
    return x_TD.index_select(0, plan.token_N)


def _soft_slots(x_TD: Tensor, plan: RoutingPlan) -> Tensor:
    """Soft MoE slots: every slot a dispatch-weighted mix of its group's tokens, rows (e, g, p).

    The mix runs in the dispatch weights' dtype (router_dtype, fp32) and the slots are cast to x's.
    """
    assert plan.soft is not None
    G, S, E = plan.num_groups, plan.tokens_per_group, plan.num_experts
    dispatch_GSJ = plan.soft.dispatch_GSJ
    D, per_expert = x_TD.shape[-1], dispatch_GSJ.shape[-1] // E  # explicit sizes: G may be 0
    x_GSD = x_TD.reshape(G, S, D).to(torch.promote_types(x_TD.dtype, dispatch_GSJ.dtype))
    with autocast_off(x_TD.device):
        slots_GJD = torch.einsum("gsj,gsd->gjd", dispatch_GSJ.to(x_GSD.dtype), x_GSD).to(x_TD.dtype)
    return slots_GJD.reshape(G, E, per_expert, D).transpose(0, 1).reshape(E * G * per_expert, D)


def combine_rows(y_ND: Tensor, plan: RoutingPlan, num_tokens: int) -> Tensor:
    """y_TD = sum of gate_N * y_ND over the rows of each token (index_add; dropped copies add 0).

    Soft MoE: y_s = sum over the group's slots j of combine[s, j] * y_j. The weights stay in
    router_dtype (fp32) and the sum runs in the wider of it and y's dtype: bf16 expert outputs are
    weighted and summed in fp32 (the caller casts the result to the layer's output dtype).
    """
    if plan.soft is not None:
        G, E, D = plan.num_groups, plan.num_experts, y_ND.shape[-1]
        combine_GSJ = plan.soft.combine_GSJ
        J = combine_GSJ.shape[-1]  # explicit sizes: G may be 0
        y_GJD = y_ND.reshape(E, G, J // E, D).transpose(0, 1).reshape(G, J, D)
        y_GJD = y_GJD.to(torch.promote_types(y_ND.dtype, combine_GSJ.dtype))
        with autocast_off(y_ND.device):
            return torch.einsum("gsj,gjd->gsd", combine_GSJ.to(y_GJD.dtype), y_GJD).reshape(num_tokens, D)
    return weighted_sum_rows(y_ND, plan.gate_N, plan.token_N, num_tokens)


def weighted_sum_rows(y_ND: Tensor, gate_N: Tensor, index_N: Tensor, num_out: int) -> Tensor:
    """out[i] = Σ over the rows n with index_N[n] = i of gate_N[n] · y_ND[n] (differentiable in y and
    gate), summed in the wider dtype of y and the gates."""
    if torch.compiler.is_compiling():  # the chunk loops' trip counts depend on the data: the plain math
        dtype = torch.promote_types(y_ND.dtype, gate_N.dtype)
        rows_ND = y_ND.to(dtype) * gate_N.to(dtype)[:, None]
        return rows_ND.new_zeros((num_out, y_ND.shape[-1])).index_add(0, index_N, rows_ND)
    out: Tensor = _WeightedIndexAdd.apply(y_ND, gate_N, index_N, num_out)
    return out


class _WeightedIndexAdd(torch.autograd.Function):
    """out_TD[t] = Σ over the rows n of token t of gate_N[n] · y_ND[n].

    The same math as ``zeros.index_add(0, token_N, y_ND * gate_N[:, None])`` under autograd, with
    fewer passes over the [N, D] rows, which are memory-bound, and with no [N, D] temporary in the
    sum's dtype: the weighted rows are made a chunk of rows at a time, and the backward gathers the
    output gradient a chunk at a time into the row gradient, takes the gate gradient's dot products
    from that chunk and scales it in place. Chunks are cache-sized on CPU; on CUDA, and for bf16
    rows with fp32 gates (where the chunk's temporaries are fp32), they bound the temporaries to
    ``WIDE_CHUNK`` rows (32 MiB at D = 512 in fp32) instead of three fp32 copies of all rows. The
    sum runs in the wider dtype of y and the gates.
    """

    CHUNK = 2048  # rows per chunk: 4 MiB of fp32 temporaries at D = 512
    BACKWARD_CHUNK = 512  # 1 MiB at D = 512: measured 8–15 % faster than 2048 rows
    WIDE_CHUNK = 16384  # CUDA, or rows narrower than the sum: bounded temporaries, few launches

    @staticmethod
    def forward(ctx: Any, y_ND: Tensor, gate_N: Tensor, token_N: Tensor, num_tokens: int) -> Tensor:
        ctx.save_for_backward(y_ND, gate_N, token_N)
        dtype = torch.promote_types(y_ND.dtype, gate_N.dtype)
        out_TD = y_ND.new_zeros((num_tokens, y_ND.shape[-1]), dtype=dtype)
        chunk = _WeightedIndexAdd.chunk(y_ND, gate_N, _WeightedIndexAdd.CHUNK)
        for a in range(0, y_ND.shape[0], chunk):
            b = a + chunk
            out_TD.index_add_(0, token_N[a:b], y_ND[a:b].to(dtype) * gate_N[a:b, None].to(dtype))
        return out_TD

    @staticmethod
    def chunk(y_ND: Tensor, gate_N: Tensor, rows: int) -> int:
        """Rows per chunk: ``rows`` for same-dtype CPU tensors, else ``WIDE_CHUNK``."""
        same = y_ND.device.type == "cpu" and y_ND.dtype == gate_N.dtype
        return rows if same else _WeightedIndexAdd.WIDE_CHUNK

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_TD: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        y_ND, gate_N, token_N = ctx.saved_tensors
        need_rows, need_gate = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_gate = gate_N.new_empty(gate_N.shape) if need_gate else None
        if y_ND.dtype == g_TD.dtype:  # the gathered gradient is the row gradient, scaled in place
            grad_y = y_ND.new_empty(y_ND.shape)
            chunk = _WeightedIndexAdd.chunk(y_ND, gate_N, _WeightedIndexAdd.BACKWARD_CHUNK)
            for a in range(0, y_ND.shape[0], chunk):
                b = a + chunk  # the chunk's rows stay in cache for all three
                torch.index_select(g_TD, 0, token_N[a:b], out=grad_y[a:b])
                if grad_gate is not None and grad_gate.dtype == grad_y.dtype:
                    torch.linalg.vecdot(grad_y[a:b], y_ND[a:b], out=grad_gate[a:b])
                elif grad_gate is not None:
                    grad_gate[a:b] = torch.linalg.vecdot(grad_y[a:b], y_ND[a:b])
                grad_y[a:b].mul_(gate_N[a:b, None].to(grad_y.dtype))
            return (grad_y if need_rows else None), grad_gate, None, None
        # rows narrower than the sum (bf16 rows, fp32 gates): a chunk of the wide gradient at a time
        grad_rows = y_ND.new_empty(y_ND.shape) if need_rows else None
        for a in range(0, y_ND.shape[0], _WeightedIndexAdd.WIDE_CHUNK):
            b = a + _WeightedIndexAdd.WIDE_CHUNK
            g_nD = g_TD.index_select(0, token_N[a:b])
            if grad_gate is not None:
                grad_gate[a:b] = torch.linalg.vecdot(g_nD, y_ND[a:b].to(g_nD.dtype)).to(gate_N.dtype)
            if grad_rows is not None:
                grad_rows[a:b] = g_nD.mul_(gate_N[a:b, None].to(g_nD.dtype))
        return grad_rows, grad_gate, None, None


class _GatherPadded(torch.autograd.Function):
    """rows_ND = x_TD[token_N] for a padded plan; the backward adds each row's gradient into
    ``target_N``'s row of a [T + 1, D] buffer and drops row T: the dropped rows' gradients, which
    the grouped GEMM leaves undefined, never reach x."""

    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, token_N: Tensor, target_N: Tensor) -> Tensor:
        ctx.save_for_backward(target_N)
        ctx.num_tokens = x_TD.shape[0]
        return x_TD.index_select(0, token_N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_ND: Tensor) -> tuple[Tensor, None, None]:
        (target_N,) = ctx.saved_tensors
        grad_TD = g_ND.new_zeros((ctx.num_tokens + 1, g_ND.shape[-1])).index_add_(0, target_N, g_ND)
        return grad_TD[:ctx.num_tokens], None, None


class LocalDispatcher:
    """Every expert on this device (expert-parallel size 1): gather, run, combine.

    A padded plan (capacity-bounded routing where the expert GEMMs take device offsets) runs its
    first min(G·S·K, E·G·C) rows, the kept ones first (never more rows than a capacity buffer): the
    grouped GEMM computes the first ``counts_E.sum()`` rows only, and the other rows' outputs and
    input gradients go to a discarded row T. Nothing is read on the host.
    """

    def dispatch(self, x_TD: Tensor, plan: RoutingPlan, info: CallInfo | None = None) -> Dispatched:
        """Rows of x for all E experts, sorted by expert."""
        target_N = None
        if plan.padded:
            plan = plan.bounded()
            rows = torch.arange(plan.token_N.shape[0], device=x_TD.device)
            target_N = torch.where(rows < plan.counts_E.sum(), plan.token_N, x_TD.shape[0])
            rows_ND = _GatherPadded.apply(x_TD, plan.token_N, target_N)
        else:
            rows_ND = gather_rows(x_TD, plan)
        report = CommReport("local", (rows_ND.shape[0],), (rows_ND.shape[0],), rows_ND.shape[-1],
                            rows_ND.element_size())
        return Dispatched(rows_ND, plan.counts_E[None], plan, counts_E_global=plan.counts_E, comm=report,
                          selected_E_global=plan.selected_E, target_N=target_N)

    def combine(self, y_nD: Tensor, dispatched: Dispatched, num_tokens: int) -> Tensor:
        """Weighted sum of the expert outputs into their tokens."""
        target_N = dispatched.target_N
        if target_N is None:
            return combine_rows(y_nD, dispatched.plan, num_tokens)
        # a dropped row's gate is 0 and its output (undefined) lands in the discarded row T
        gate_N = torch.where(target_N < num_tokens, dispatched.plan.gate_N, 0)
        return weighted_sum_rows(y_nD, gate_N, target_N, num_tokens + 1)[:num_tokens]


__all__ = ["CallInfo", "Dispatched", "Dispatcher", "ExchangeState", "LocalDispatcher", "combine_rows",
           "gather_rows", "weighted_sum_rows"]
