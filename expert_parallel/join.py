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

    Every rank must enter the block (with the same model). Leaving it by an exception does not
    serve: the peers then end with the exchange's error at the collective timeout.

    Raises:
        RuntimeError: inside the block, a training forward (train mode with grad enabled), or a
            backward through a forward made inside it.
        ValueError: the model's MoE layers use different expert-parallel groups, or the layers on
            its group exchange counts of different widths (different numbers of experts or
            exchanges), which one serving rank cannot tell apart.
        CollectiveError: the ranks run different layers or calls (every rank raises it).
    """
    group = _ep_group_of(model)
    if group is None:  # no peers: nothing to serve
        yield
        return
    layers = layers_on(group)
    widths = {layer.dispatcher.count_width for layer in layers.values()}
    if len(widths) > 1:
        raise ValueError(f"ep.join: the MoE layers on these ranks exchange counts of widths {sorted(widths)} "
                         f"(different num_experts or exchange): a serving rank could not tell which "
                         f"layer a peer runs")
    before = {i: layer.joined for i, layer in layers.items()}
    for layer in layers.values():
        layer.joined = True
    try:
        yield
        _serve(layers, group, widths.pop())
    finally:
        for i, layer in layers.items():
            layer.joined = before[i]


def _ep_group_of(model: nn.Module) -> ProcessGroup | None:
    """The one expert-parallel group of the model's MoE layers (None: no layer has peers)."""
    groups = {tuple(dist.get_process_group_ranks(m.ep_group)): m.ep_group for m in model.modules()
              if isinstance(m, MoE) and m.ep_size > 1 and m.ep_group is not None}
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
    with torch.no_grad(), cast:
        layer(x_BLD)
