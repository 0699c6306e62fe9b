"""``ep.join``: loops whose ranks run different numbers of forwards.

Every forward of an expert-parallel MoE is a collective over its expert-parallel group: a rank whose
evaluation set has fewer batches, or whose ``generate()`` hit EOS first, would leave its peers waiting
in their next exchange. Inside ``with ep.join(model):`` a rank that leaves the block keeps serving:
it joins each count exchange its peers start (the header of each row says which layer and call, see
``comm.exchange``), runs that layer with zero rows of its own (its experts compute the rows the peers
send, exactly as in a lockstep run) and leaves once every rank of the group has left the block. The
peers' results are the lockstep results.

Only forwards are served: the backward of a forward made inside the block is refused (the finished
rank could not serve it), and a training forward (train mode with grad enabled) is refused at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.nn.parallel import DistributedDataParallel

from .comm.exchange import (
    HEADER,
    ROW_DTYPES,
    SERVING,
    AllToAllDispatcher,
    CollectiveError,
    HierarchicalDispatcher,
    gather_counts,
    health_group,
    layers_on,
    with_header,
)
from .comm.grads import is_sharded
from .comm.watchdog import read_on_host
from .layer import MoE
from .ops.dispatch import CallInfo


@contextlib.contextmanager
def join(model: nn.Module) -> Iterator[None]:
    """Lets the ranks of an expert-parallel job run different numbers of forwards of ``model``.

    Use it around loops whose length differs between ranks: evaluation over ``dataset[rank::world]``,
    a rank with no batch at all, ``generate()`` (``ep.hf`` models do this for you). A rank that
    leaves the block serves its peers' exchanges with zero rows of its own until every rank of its
    expert-parallel group has left; every rank's results equal those of the same batches run in
    lockstep. Forward-only: evaluation, generation, ``torch.no_grad`` or ``model.eval()`` loops.

    Every rank must enter the block (with the same model). Inside it, only the MoE layers may
    communicate: a collective of the user's in the loop (a per-batch ``dist.all_reduce`` of a
    metric) would wait for the finished rank; reduce metrics after the block. Leaving the block by
    an exception does not serve: the peers then end with the exchange's error at the timeout.
    A copy of the model (``copy.deepcopy`` on every rank) is served as a model of its own.

    Raises:
        RuntimeError: inside the block, a training forward (train mode with grad enabled), or a
            backward through a forward made inside it.
        ValueError: the model is a DistributedDataParallel (pass its ``.module``) or holds
            ``ep.fully_shard`` units (their forwards all-gather over the job); its MoE layers use
            different expert-parallel groups, or exchange counts of different widths (different
            numbers of experts or exchanges), which one serving rank cannot tell apart.
        CollectiveError: the ranks run different layers or calls (every rank raises it).
    """
    _refuse_wrappers(model)
    own = [m for m in model.modules() if isinstance(m, MoE) and m.ep_size > 1]
    group = _ep_group_of(own)
    if group is None:  # no peers: nothing to serve
        yield
        return
    widths = {layer.dispatcher.count_width for layer in own}  # type: ignore[attr-defined]
    if len(widths) > 1:
        raise ValueError(f"ep.join: the model's MoE layers exchange counts of widths {sorted(widths)} "
                         f"(different num_experts or exchange): a serving rank could not tell which "
                         f"layer a peer runs")
    for layer in own:  # NOTE: collective for a layer loaded since it was built on meta (every rank)
        if not layer.replicas_checked:
            layer.check_replicas()
    before = [layer.joined for layer in own]
    for layer in own:
        layer.joined = True
    width = next(iter(widths))
    try:
        yield
        _serve({i: m for i, m in layers_on(group).items() if m.dispatcher.count_width == width},
               group, width)
    finally:
        for layer, joined in zip(own, before, strict=True):
            layer.joined = joined


def _refuse_wrappers(model: nn.Module) -> None:
    """ValueError for models whose forward runs collectives of its own (DDP's buffer broadcast,
    FSDP2's all-gathers), which a serving rank, running only the MoE layers, would not join."""
    if isinstance(model, DistributedDataParallel):
        raise ValueError("ep.join: the model is a DistributedDataParallel, whose forward may broadcast "
                         "buffers; evaluate its .module inside ep.join(model.module)")
    if is_sharded(model):
        raise ValueError("ep.join: the model is sharded (ep.fully_shard): every forward all-gathers "
                         "parameters over the job, which a finished rank cannot serve; give every rank "
                         "the same number of batches (an empty batch is fine: docs/training.md)")


def _ep_group_of(layers: list[MoE]) -> ProcessGroup | None:
    """The one expert-parallel group of ``layers`` (None: no layer has peers)."""
    groups = {tuple(dist.get_process_group_ranks(m.ep_group)): m.ep_group for m in layers
              if m.ep_group is not None}
    if len(groups) > 1:
        raise ValueError(f"ep.join: the model's MoE layers use different expert-parallel groups "
                         f"{sorted(groups)}; join one group's layers at a time")
    return next(iter(groups.values()), None)


def _serve(layers: dict[int, MoE], group: ProcessGroup, width: int) -> None:
    """Joins the peers' count exchanges, runs each named layer with no rows of this rank's, until
    every rank of the group is serving."""
    device = next(iter(layers.values())).router.weight.device
    info = CallInfo("ep.join (serving)")
    health = health_group(group)
    counts = torch.zeros(width - HEADER, dtype=torch.int64, device=device)
    while True:
        # NOTE: collective: the count exchange a peer's layer runs (or every rank's last one).
        table = gather_counts(with_header(counts, info, SERVING, torch.float32), info, group, health)
        heads = read_on_host(table[:, :HEADER], "ep.join: reading the peers' headers")  # NOTE: host sync
        active = [h for h in heads if h[2] != SERVING]
        if not active:
            return
        layer = layers.get(active[0][0])
        if layer is None or active[0][4] >= len(ROW_DTYPES):
            raise CollectiveError(f"ep.join: a peer runs MoE layer #{active[0][0]} with rows of dtype code "
                                  f"{active[0][4]}, which this serving rank cannot run")
        _serve_call(layer, table, active[0][1], ROW_DTYPES[active[0][4]])


def _serve_call(layer: MoE, table: torch.Tensor, call: int, dtype: torch.dtype) -> None:
    """One call of ``layer`` with zero rows, its count exchange already gathered (``table``), its
    rows in the peers' dtype (under autocast where that differs from the parameters')."""
    weight = layer.router.weight
    dispatcher = layer.dispatcher
    assert isinstance(dispatcher, AllToAllDispatcher | HierarchicalDispatcher)  # layers with peers
    dispatcher.preset = table  # the layer's count exchange takes it instead of gathering
    if call:
        layer.calls = call - 1  # the forward counts this call
    x_BLD = torch.empty((1, 0, layer.cfg.d_model), dtype=weight.dtype, device=weight.device)
    cast = (torch.autocast(weight.device.type, dtype=dtype) if dtype != weight.dtype
            else contextlib.nullcontext())
    try:
        with torch.no_grad(), cast:
            layer(x_BLD)
    finally:
        dispatcher.preset = None  # never left for a later lockstep call, whatever raised
