"""The all-to-all exchange: token rows to the ranks that own their experts, expert outputs back.

Rows of a plan are sorted by (expert, group, slot), and rank q of the expert-parallel group owns experts
[q·e, (q+1)·e), so the rows for each destination rank are one contiguous block.

One exchange serves capacity and dropless mode (capacity mode only adds drops, removed before any data
moves): ranks all-gather their per-expert counts ([E] int64, which also gives the global
expert_counts), then ``all_to_all_single`` moves exactly the kept rows with variable split sizes.
Nothing is padded. The experts take the received rows as they are: one segment per source rank,
sorted by local expert inside (``counts_Re`` = the received [R, e] counts).

The way back is the mirror image. Gradients flow through both exchanges (``_AllToAll``).
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from ..ops.dispatch import (
    CallInfo,
    CommReport,
    Dispatched,
    ExchangeState,
    combine_rows,
    gather_rows,
    weighted_sum_rows,
)
from ..ops.nodes import dedup_by_node, fan_out
from ..ops.plan import RoutingPlan
from .distributed import job_timeout
from .watchdog import in_flight, read_on_host

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective of an MoE call failed or timed out; the message says which layer, call and phase."""


@dataclass
class _RanksState:
    """What the library keeps per set of expert-parallel ranks: the default group it was made under,
    the health group, and the expert-parallel layers built on those ranks by number."""

    world: ProcessGroup
    health: ProcessGroup
    layers: weakref.WeakValueDictionary[int, Any] = field(default_factory=weakref.WeakValueDictionary)
    built: int = 0


# One entry per set of ranks, shared by every layer on those ranks. Process groups are process-wide
# by nature (torch keeps its own registry); an entry made under an earlier default group (destroyed
# and initialised again) is never reused.
_HEALTH_GROUPS: dict[tuple[int, ...], _RanksState] = {}


def _ranks_state(group: ProcessGroup) -> _RanksState:
    ranks = tuple(dist.get_process_group_ranks(group))
    world = dist.group.WORLD
    cached = _HEALTH_GROUPS.get(ranks)
    if cached is not None and cached.world is world:
        return cached
    # NOTE: collective among the group's ranks only (a store-based rendezvous).
    made = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    assert world is not None and made is not None  # a process group exists: we are inside one
    _HEALTH_GROUPS[ranks] = _RanksState(world, made)
    return _HEALTH_GROUPS[ranks]


def health_group(group: ProcessGroup) -> ProcessGroup:
    """The gloo group over ``group``'s ranks that only failure diagnostics use.

    Created on first use (a collective among those ranks only, when the first layer on them is
    built), then cached: a model with many MoE layers on one expert-parallel group holds one health
    group, not one per layer. Its monitored
    barrier still reaches every live rank after a data collective failed, and names the others.
    """
    return _ranks_state(group).health


def register_layer(group: ProcessGroup, layer: Any) -> int:
    """Numbers an expert-parallel layer on ``group``'s ranks: 1, 2, ... in construction order.

    Expert-parallel layers are built on every rank of their group in the same order (their
    construction is collective), so a number names the same layer on every rank; the count exchange
    sends it, and ``ep.join`` finds by it the layer a peer is running. ``layer`` is held weakly.
    """
    state = _ranks_state(group)
    state.built += 1
    state.layers[state.built] = layer
    return state.built


def layers_on(group: ProcessGroup) -> dict[int, Any]:
    """The live expert-parallel layers on ``group``'s ranks, by number."""
    return dict(_ranks_state(group).layers)


def forget_groups() -> None:
    """Drops the cached health groups and sub-groups (at shutdown: they hold no process group then)."""
    _HEALTH_GROUPS.clear()
    _SUBGROUPS.clear()


NOT_LOCKSTEP = ("if every rank is alive, the ranks probably run different numbers of MoE forwards "
                "(uneven evaluation batches, generate() stopping at different steps, a rank with no "
                "batch) or a peer is inside a collective of its own: run such loops inside "
                "`with ep.join(model):`, give every rank the same number of batches, or let "
                "generate() run synced (docs/reliability.md, 'When ranks do different things')")


def _unresponsive_ranks(health: ProcessGroup | None) -> str:
    """Names the ranks that do not reach a monitored barrier on the health group (hung or dead)."""
    if health is None:
        return ""
    try:  # NOTE: collective (every rank whose exchange failed lands here)
        dist.monitored_barrier(health, timeout=timedelta(seconds=5), wait_all_ranks=True)
    except RuntimeError as err:
        return f" [monitored barrier: {str(err).splitlines()[0]}]"
    return " [monitored barrier: every rank of the group answered]"


def guarded(info: CallInfo, phase: str, detail: str, group: ProcessGroup, fn: Callable[[], T],
            health: ProcessGroup | None = None) -> T:
    """Runs one collective; a failure becomes a CollectiveError naming layer, call, phase, sizes.

    ``health``: a gloo group over the same ranks that data collectives never use; after a failure its
    monitored barrier still reaches every live rank and names the ones that do not answer.
    """
    try:
        with in_flight(f"{info.layer} call {info.call}, {phase} ({detail})"):
            return fn()
    except RuntimeError as err:
        if isinstance(err, CollectiveError):
            raise
        where = f"{info.layer} call {info.call}, {phase} ({detail}) on rank {dist.get_rank()}"
        raise CollectiveError(f"{where} failed: {str(err).splitlines()[0]}"
                              f"{_unresponsive_ranks(health)}; {NOT_LOCKSTEP}") from err


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward is the exchange with the splits swapped.

    torch.distributed.nn.functional.all_to_all_single does the same but is deprecated in torch 2.13
    and its replacement is private, so this wraps the stable ``dist.all_to_all_single`` directly.
    """

    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, out_splits: list[int], in_splits: list[int],
                group: ProcessGroup, info: CallInfo, phase: str, health: ProcessGroup | None) -> Tensor:
        ctx.splits, ctx.group, ctx.info, ctx.phase = (out_splits, in_splits), group, info, phase
        ctx.health = health
        out = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        detail = f"sending rows {in_splits}, receiving {out_splits}"
        # NOTE: collective (all-to-all over the expert-parallel group).
        guarded(info, phase, detail, group, lambda: dist.all_to_all_single(
            out, x_ND.contiguous(), out_splits, in_splits, group=group), health)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.info.joined:
            raise RuntimeError(f"{ctx.info.layer} call {ctx.info.call}: backward through a forward that ran "
                               f"inside ep.join, whose finished ranks serve forwards only; train with "
                               f"the same number of batches on every rank (docs/reliability.md)")
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        detail = f"sending gradient rows {out_splits}, receiving {in_splits}"
        # NOTE: collective (all-to-all of the gradients, splits swapped).
        guarded(ctx.info, f"{ctx.phase} backward", detail, ctx.group, lambda: dist.all_to_all_single(
            grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group), ctx.health)
        return grad_in, None, None, None, None, None, None


def all_to_all(x_ND: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup | None,
               info: CallInfo | None = None, phase: str = "all-to-all",
               health: ProcessGroup | None = None) -> Tensor:
    """Differentiable all_to_all_single over ``group`` (rows of x split by in_splits); a group of
    one rank (None) keeps x as it is."""
    if group is None:
        return x_ND
    if info is not None and info.check_splits:
        check_splits(in_splits, out_splits, group, info, phase, health, x_ND.device)
    out: Tensor = _AllToAll.apply(x_ND, out_splits, in_splits, group, info or CallInfo(), phase, health)
    return out


def check_splits(send: list[int], recv: list[int], group: ProcessGroup, info: CallInfo, phase: str,
                 health: ProcessGroup | None = None, device: torch.device | None = None) -> None:
    """Debug mode: all ranks must be in the same layer call, and each rank's receive sizes must equal
    what its peers send (gloo would silently read garbage). Decided together: every rank raises."""
    R, me = len(send), dist.get_rank(group)
    mine = torch.tensor([zlib.crc32(info.layer.encode()), info.call, *send], dtype=torch.int64, device=device)
    table = [torch.zeros_like(mine) for _ in range(R)]
    # NOTE: collective (debug mode only): all-gather of (layer, call, send sizes).
    guarded(info, f"{phase} split check", f"sending {send}", group,
            lambda: dist.all_gather(table, mine, group=group), health)
    calls = {(int(t[0]), int(t[1])) for t in table if int(t[1])}  # call 0 (compiled) matches any
    expected = [int(table[q][2 + me]) for q in range(R)]
    problem = ""
    if len(calls) > 1:
        problem = (f"ranks are in different MoE calls (call numbers {[int(t[1]) for t in table]}, "
                   f"layer hashes {[int(t[0]) for t in table]}): the layers are called in a different "
                   f"order or a different number of times on different ranks")
    if not problem and expected != list(recv):
        bad = [q for q in range(R) if expected[q] != recv[q]]
        problem = (f"split sizes disagree on rank {me}: peers {bad} send {[expected[q] for q in bad]} rows, "
                   f"this rank expects {[recv[q] for q in bad]}")
    flag = torch.tensor([1 if problem else 0], device=device)
    guarded(info, f"{phase} split check", "agreement flag", group,  # NOTE: collective
            lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group), health)
    if read_on_host(flag, f"{info.layer} call {info.call}, {phase} split check (reading the flag)")[0]:
        raise CollectiveError(f"{info.layer} call {info.call}, {phase}: "
                              f"{problem or 'a peer found mismatched split sizes or call order'}")


# The header of every rank's row in the count exchange: where the rank is in its call sequence.
HEADER = 5  # layer number, call number, phase, NaN/Inf flags, code of the rows' dtype
FORWARD, SERVING = 1, 2  # phases: a forward of the layer; a finished rank serving inside ep.join
ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def with_header(counts: Tensor, info: CallInfo, phase: int, dtype: torch.dtype) -> Tensor:
    """``counts`` after this rank's header (int64, on the counts' device)."""
    code = ROW_DTYPES.index(dtype) if dtype in ROW_DTYPES else len(ROW_DTYPES)
    # Each value a fill kernel's scalar argument: no host-to-device copy, no sync (setting elements
    # of a CUDA tensor from Python ints would copy each one and wait for it).
    head = [counts.new_full((1,), v) for v in (info.layer_id, info.call, phase, 0, code)]
    if info.flags is not None:
        head[3] = info.flags.reshape(1).to(counts.dtype)
    return torch.cat([*head, counts])


class CountExchange:
    """The count exchange of a dispatcher: every rank's header and counts, all-gathered, or the
    table ``ep.join``'s serving rank gathered already (``preset``, taken once)."""

    group: ProcessGroup
    health: ProcessGroup | None
    preset: Tensor | None = None

    def gathered(self, mine: Tensor, info: CallInfo) -> Tensor:
        """[R, C]: every rank's header and counts (``mine``: this rank's [C])."""
        preset, self.preset = self.preset, None
        return preset if preset is not None else gather_counts(mine, info, self.group, self.health)


def checked_counts(host: list[list[int]], info: CallInfo, group: ProcessGroup) -> list[list[int]]:
    """The host copy of the count table without its headers, after :func:`check_positions`: raises
    on every rank alike when the ranks are in different calls, send rows of different dtypes or one
    flagged NaN/Inf. (The host read itself stays in the dispatcher: under torch.compile each frame
    between the layer and the read adds a graph break.)"""
    check_positions([row[:HEADER] for row in host], info, group)
    return [row[HEADER:] for row in host]


def gather_counts(mine: Tensor, info: CallInfo, group: ProcessGroup, health: ProcessGroup | None) -> Tensor:
    """[R, C]: every rank's header and counts (``mine``: this rank's [C])."""
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    # NOTE: collective: all-gather of the headers and counts over the expert-parallel group.
    guarded(info, "count exchange", f"{mine.numel() - HEADER} counts", group,
            lambda: dist.all_gather(gathered, mine, group=group), health)
    return torch.stack(gathered)


def check_positions(heads: list[list[int]], info: CallInfo, group: ProcessGroup) -> None:
    """Raises the same error on every rank of the exchange (each holds the same headers) when the
    ranks that run a forward are in different layers or calls (call 0, a compiled call, matches
    any), send rows of different dtypes, or one of them flagged NaN/Inf in its input or logits."""
    active = [h for h in heads if h[2] != SERVING]
    apart = any(len(set(values)) > 1 for values in ([h[0] for h in active], [h[1] for h in active if h[1]],
                                                     [h[4] for h in active]))
    flagged = [q for q, h in enumerate(heads) if h[3]]
    if not apart and not flagged:
        return
    ranks = dist.get_process_group_ranks(group)
    if apart:
        layers = layers_on(group)
        where = "; ".join(f"rank {r}: {_position(h, layers)}" for r, h in zip(ranks, heads, strict=True))
        raise CollectiveError(f"{info.layer} call {info.call}, count exchange: ranks are in different MoE "
                              f"calls ({where}): the layers are called in a different order or a "
                              f"different number of times on different ranks; {NOT_LOCKSTEP}")
    what = "the input" if any(heads[q][3] & 1 for q in flagged) else "the router logits"
    raise FloatingPointError(f"{info.layer} call {info.call}: NaN or Inf in {what} on rank "
                             f"{', '.join(str(ranks[q]) for q in flagged)} of the expert-parallel group")


def _position(head: list[int], layers: dict[int, Any]) -> str:
    """One rank's place in its call sequence, from its header."""
    if head[2] == SERVING:
        return "finished, serving its peers inside ep.join"
    layer = layers.get(head[0])
    name = f"{layer.layer_name!r} " if layer is not None else ""
    dtype = ROW_DTYPES[head[4]] if head[4] < len(ROW_DTYPES) else "other"
    return f"layer {name}(#{head[0]}) call {head[1] or '? (compiled)'}, rows {dtype}"


class AllToAllDispatcher(CountExchange):
    """Dispatcher over an expert-parallel group of R ranks, each holding E / R experts."""

    def __init__(self, group: ProcessGroup, num_experts: int, ranks_per_node: int = 0) -> None:
        self.group = group
        self.R, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.e = num_experts // self.R
        self.P = ranks_per_node  # for the traffic report's link classes only (0: one node)
        # NOTE: collective for the first layer on these ranks (every rank builds it), cached after:
        # made now rather than at the first exchange, where a late or dead peer would turn the
        # rendezvous into an unnamed store error (and group creation would sit inside a compiled step).
        self.health = health_group(group)
        self.count_width = HEADER + 2 * num_experts  # one rank's row in the count exchange

    def dispatch(self, x_TD: Tensor, plan: RoutingPlan, info: CallInfo | None = None) -> Dispatched:
        """Gathers the rows of the plan and moves each to the rank that owns its expert."""
        return self._exchange(x_TD, plan, info or CallInfo())

    def combine(self, y_nD: Tensor, dispatched: Dispatched, num_tokens: int) -> Tensor:
        """Sends the expert outputs back to the ranks of their tokens and combines them there."""
        ex = dispatched.exchange
        if ex is None:
            raise ValueError("combine got a Dispatched without exchange sizes: it was not made by "
                             "this dispatcher's dispatch")
        # The experts kept the received order, so the rows go straight back.
        y_rows = all_to_all(y_nD, ex.send_rows, ex.recv_rows, self.group, ex.info, "combine", self.health)
        return combine_rows(y_rows, dispatched.plan, num_tokens)

    def _exchange(self, x_TD: Tensor, plan: RoutingPlan, info: CallInfo) -> Dispatched:
        """Counts all-gather, then exactly the kept rows to their experts' ranks (variable splits)."""
        R, e, D = self.R, self.e, x_TD.shape[-1]
        # 1. Count exchange: every rank learns every rank's per-expert kept (and selected) counts,
        # after a header that says where each rank is (a mismatch raises on every rank).
        mine_2E = torch.cat([plan.counts_E, plan.selected_E])
        table_RC = self.gathered(with_header(mine_2E, info, FORWARD, x_TD.dtype), info)
        # NOTE: host-device sync, the only one of the exchange: split sizes are needed on the host.
        host = read_on_host(table_RC, f"{info.layer} call {info.call}, count exchange (reading the counts)")
        table = [row[:plan.num_experts] for row in checked_counts(host, info, self.group)]  # [R][E] kept
        counts_RE, selected_RE = table_RC[:, HEADER:].split(plan.num_experts, dim=1)
        recv_Re = counts_RE[:, self.rank * e:(self.rank + 1) * e]
        mine = slice(self.rank * e, (self.rank + 1) * e)
        send_rows = [sum(table[self.rank][q * e:(q + 1) * e]) for q in range(R)]
        recv_rows = [sum(row[mine]) for row in table]
        # 2. Variable-size all-to-all of exactly the kept rows (a padded plan cut to them: their
        # number came with the table).
        plan = plan.truncated(sum(send_rows))
        rows_ND = gather_rows(x_TD, plan)
        recv = all_to_all(rows_ND, recv_rows, send_rows, self.group, info, "dispatch", self.health)
        # 3. The experts take the rows as received: one segment per source rank, expert-major inside.
        mode = "dropless" if plan.capacity is None else "capacity"
        report = CommReport(mode, tuple(send_rows), tuple(recv_rows), D, rows_ND.element_size(),
                            control_bytes=R * mine_2E.numel() * 8, rank=self.rank, ranks_per_node=self.P)
        ex = ExchangeState(send_rows, recv_rows, info)
        return Dispatched(recv, recv_Re, plan, counts_E_global=counts_RE.sum(0), comm=report,
                          exchange=ex, counts_host=[c for row in table for c in row[mine]],
                          selected_E_global=selected_RE.sum(0))


# Sub-groups of an expert-parallel group (same-node ranks, same-local-index ranks), shared by every
# layer on those ranks; keyed like the health groups.
_SUBGROUPS: dict[tuple[int, ...], tuple[ProcessGroup, ProcessGroup]] = {}


def subgroup(ranks: list[int], parent: ProcessGroup) -> ProcessGroup | None:
    """The process group over ``ranks`` (a subset of ``parent``'s): None for one rank, ``parent``
    itself for all of them, else made once (a collective among ``ranks`` only) and cached."""
    if len(ranks) == 1:
        return None
    if ranks == dist.get_process_group_ranks(parent):
        return parent
    key, world = tuple(ranks), dist.group.WORLD
    cached = _SUBGROUPS.get(key)
    if cached is not None and cached[0] is world:
        return cached[1]
    # NOTE: collective among ``ranks`` only: torch names the group from the ranks and the number of
    # groups this process has made, so every member must have made as many before (true inside the
    # library, which makes its groups on every rank in the same order). The job's timeout applies.
    made = dist.new_group(list(ranks), use_local_synchronization=True, timeout=job_timeout())
    assert world is not None and made is not None
    _SUBGROUPS[key] = (world, made)
    return made


@dataclass(frozen=True)
class NodeExchangeState(ExchangeState):
    """What the hierarchical combine needs (``send_rows``/``recv_rows``: the inside-node splits).

    Attributes:
        node_send: unique rows this rank sent to its proxy on each node ([V]).
        node_recv: unique rows it received, as a proxy, from the source on each node ([V]).
        token_U: the token of each unique row it sent.
        row_H: the received unique row of each copy it forwarded (expert order).
        gate_H: the gate of each copy it forwarded (differentiable).
    """

    node_send: list[int] = field(default_factory=list)
    node_recv: list[int] = field(default_factory=list)
    token_U: Tensor | None = None
    row_H: Tensor | None = None
    gate_H: Tensor | None = None


class HierarchicalDispatcher(CountExchange):
    """Dispatcher over V nodes of P ranks that sends each token to each remote node at most once.

    Rank r = v·P + j (node v, local index j). Dispatch: (1) one all-gather of every rank's per-expert
    and per-node counts gives every split size below (one host copy); (2) over the *rail* group (the
    ranks with local index j, one per node) each rank sends its unique (node, token) rows to its proxy
    on that node, with (row, expert) and the gate of every copy; (3) over the *node* group each proxy
    fans the copies out to the ranks that own their experts. Combine runs the two all-to-alls
    backwards and sums the gate-weighted copies of a row at the proxy, so one partial output per row
    crosses back. Math in ``ops.nodes``.
    """

    def __init__(self, group: ProcessGroup, num_experts: int, ranks_per_node: int) -> None:
        self.group = group
        self.R, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.e, self.P, self.V = num_experts // self.R, ranks_per_node, self.R // ranks_per_node
        self.node, self.local = divmod(self.rank, ranks_per_node)
        ranks = dist.get_process_group_ranks(group)
        # NOTE: collectives among the rail's and the node's ranks, for the first layer on them.
        self.rail = subgroup([ranks[v * self.P + self.local] for v in range(self.V)], group)
        self.intra = subgroup(ranks[self.node * self.P:(self.node + 1) * self.P], group)
        self.health = health_group(group)
        self.count_width = HEADER + 2 * num_experts + self.V

    def dispatch(self, x_TD: Tensor, plan: RoutingPlan, info: CallInfo | None = None) -> Dispatched:
        """Deduplicates the plan's copies per node, sends them to the proxies, fans them out there."""
        if plan.soft is not None:
            raise ValueError("the hierarchical exchange needs token copies; the soft router makes slot "
                             "mixes (use MoEConfig.exchange='flat')")
        info = info or CallInfo()
        E, e, P, V = plan.num_experts, self.e, self.P, self.V
        kept_N = None
        if plan.padded:  # the kept copies are the first counts_E.sum(): compared on the device
            kept_N = torch.arange(plan.expert_N.shape[0], device=x_TD.device) < plan.counts_E.sum()
        rows = dedup_by_node(plan.token_N, plan.expert_N, x_TD.shape[0], e * P, V, kept_N)
        mine = torch.cat([plan.counts_E, plan.selected_E, rows.count_V])
        table_RC = self.gathered(with_header(mine, info, FORWARD, x_TD.dtype), info)  # NOTE: collective
        # NOTE: host-device sync, the only one of the exchange: split sizes are needed on the host.
        host = read_on_host(table_RC, f"{info.layer} call {info.call}, count exchange (reading the counts)")
        host_table = checked_counts(host, info, self.group)
        table = table_RC[:, HEADER:]  # [R, 2E + V]
        counts_RE, selected_RE, _ = table.split([E, E, V], dim=1)
        sizes = self._sizes(host_table, E)
        # The copies and unique rows this rank sends, counted in the table: the prefixes that matter.
        copies = sum(sizes["copies_send"])
        plan = plan.truncated(copies)
        token_U, meta_N2 = rows.token_U[:sum(sizes["node_send"])], rows.meta_N2[:copies]
        x_U = x_TD.index_select(0, token_U)
        phase = "dispatch to other nodes"
        recv_U = all_to_all(x_U, sizes["node_recv"], sizes["node_send"], self.rail, info, phase, self.health)
        meta_H2 = all_to_all(meta_N2, sizes["copies_recv"], sizes["copies_send"], self.rail, info,
                             f"{phase} (copy metadata)", self.health)
        gate_H = all_to_all(plan.gate_N, sizes["copies_recv"], sizes["copies_send"], self.rail, info,
                            f"{phase} (gates)", self.health)
        # what each source on my rail sent me, from the device copy of the table (no host copy)
        on_rail = table[self.local::P]
        eP = e * P
        fan = fan_out(meta_H2, on_rail[:, self.node * eP:(self.node + 1) * eP].sum(1),
                      on_rail[:, 2 * E + self.node])
        recv = all_to_all(recv_U.index_select(0, fan.row_H), sizes["intra_recv"], sizes["intra_send"],
                          self.intra, info, "dispatch inside the node", self.health)
        counts_Re = counts_RE.view(V, P, E).sum(0)[:, self.rank * e:(self.rank + 1) * e]
        state = NodeExchangeState(sizes["intra_send"], sizes["intra_recv"], info, sizes["node_send"],
                                  sizes["node_recv"], token_U, fan.row_H, gate_H[fan.order_H])
        return Dispatched(recv, counts_Re, plan, counts_E_global=counts_RE.sum(0),
                          selected_E_global=selected_RE.sum(0), comm=self._report(plan, x_TD, sizes),
                          exchange=state, counts_host=sizes["counts_host"])

    def combine(self, y_nD: Tensor, dispatched: Dispatched, num_tokens: int) -> Tensor:
        """Outputs back to the proxies, summed per row there, the partial sums back to the tokens."""
        st = dispatched.exchange
        if not isinstance(st, NodeExchangeState):
            raise ValueError("combine got a Dispatched that this hierarchical dispatcher did not make")
        assert st.row_H is not None and st.gate_H is not None and st.token_U is not None
        y_H = all_to_all(y_nD, st.send_rows, st.recv_rows, self.intra, st.info, "combine inside the node",
                         self.health)
        # The partial sums travel in the sum's dtype (fp32 for bf16 outputs and fp32 gates), so the
        # hierarchical exchange rounds what the flat one rounds (the expert outputs) and no more.
        partial_U = weighted_sum_rows(y_H, st.gate_H, st.row_H, sum(st.node_recv))
        back_U = all_to_all(partial_U, st.node_send, st.node_recv, self.rail, st.info,
                            "combine from other nodes", self.health)
        out_TD = back_U.new_zeros((num_tokens, back_U.shape[-1]),
                                  dtype=torch.promote_types(back_U.dtype, st.gate_H.dtype))
        return out_TD.index_add(0, st.token_U, back_U.to(out_TD.dtype))

    def _sizes(self, table: list[list[int]], E: int) -> dict[str, list[int]]:
        """Every split size of both stages from the all-gathered [R][2E + V] counts (host lists)."""
        e, P, V, me, node, local = self.e, self.P, self.V, self.rank, self.node, self.local
        rail = [v * P + local for v in range(V)]  # the sources (and proxies) on my rail, by node

        def copies(src: int, first: int, last: int) -> int:  # src's kept copies for experts [first, last)
            return sum(table[src][first:last])

        node_experts = slice(node * e * P, (node + 1) * e * P)
        return {
            "node_send": [table[me][2 * E + v] for v in range(V)],
            "node_recv": [table[s][2 * E + node] for s in rail],
            "copies_send": [copies(me, v * e * P, (v + 1) * e * P) for v in range(V)],
            "copies_recv": [sum(table[s][node_experts]) for s in rail],
            "intra_send": [sum(copies(s, o * e, (o + 1) * e) for s in rail)
                           for o in range(node * P, (node + 1) * P)],
            "intra_recv": [sum(copies(v * P + j, me * e, (me + 1) * e) for v in range(V)) for j in range(P)],
            "counts_host": [sum(table[v * P + j][me * e + x] for v in range(V)) for j in range(P)
                            for x in range(e)],
        }

    def _report(self, plan: RoutingPlan, x_TD: Tensor, sizes: dict[str, list[int]]) -> CommReport:
        """Rows to and from each peer over both stages, plus the copies' metadata to the proxies."""
        P, node, local = self.P, self.node, self.local
        sent, recv, meta = [0] * self.R, [0] * self.R, [0] * self.R
        copy_bytes = 8 + plan.gate_N.element_size()  # (row, expert) int32 + the gate
        # combine's partial sums go back in the sum's dtype: the bytes beyond a row of x's dtype
        sum_dtype = torch.promote_types(x_TD.dtype, plan.gate_N.dtype)
        wider = (sum_dtype.itemsize - x_TD.element_size()) * x_TD.shape[-1]
        for v in range(self.V):
            sent[v * P + local] += sizes["node_send"][v]
            recv[v * P + local] += sizes["node_recv"][v]
            meta[v * P + local] += sizes["copies_send"][v] * copy_bytes + sizes["node_recv"][v] * wider
        for j in range(P):
            sent[node * P + j] += sizes["intra_send"][j]
            recv[node * P + j] += sizes["intra_recv"][j]
        mode = "dropless" if plan.capacity is None else "capacity"
        return CommReport(mode, tuple(sent), tuple(recv), x_TD.shape[-1], x_TD.element_size(),
                          control_bytes=self.R * (2 * plan.num_experts + self.V) * 8, rank=self.rank,
                          ranks_per_node=P, exchange="hierarchical", meta_bytes=tuple(meta))
