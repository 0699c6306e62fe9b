"""DistributedDataParallel for models holding expert-parallel MoE layers: ``ep.data_parallel``.

Plain ``DistributedDataParallel(model)`` is wrong for them: its constructor broadcasts rank 0's
parameters, so every rank's experts become rank 0's, and its reducer then averages the gradients of
different experts over the whole world. ``data_parallel`` gives DDP (bucketed, overlapped with the
backward) the parameters that are replicated on every rank, and reduces the expert gradients itself
at the end of the backward, as ``ep.sync_gradients`` does: summed over the ranks that hold the same
experts (``ctx.dp_group``) and divided by the world size. DDP's ``no_sync()`` skips both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_leaves

from ..comm.distributed import DistContext
from ..comm.grads import REDUCES_EXPERTS, expert_parameter_ids, expert_reduction, split_parameters
from ..ops.routing import TopKRouter


def _per_rank_names(model: nn.Module) -> list[str]:
    """Parameters and buffers that differ between the ranks on purpose: the experts (each rank
    holds its own) and the routers' per-rank selection counts (summed by ep.update_expert_bias)."""
    expert_ids = expert_parameter_ids(model)  # frozen ones too: DDP would broadcast them
    names = [n for n, p in model.named_parameters() if id(p) in expert_ids]
    for name, module in model.named_modules():
        if isinstance(module, TopKRouter) and module.expert_load is not None:
            names.append(f"{name}.expert_load" if name else "expert_load")
    return names


class _ExpertGradients:
    """Reduces the expert gradients once at the end of every backward of a forward that ran with
    DDP's gradient synchronisation on (outside ``no_sync()``, with grad enabled), as DDP decides.

    The reduction is queued from a hook on the forward's outputs, so it joins the outermost backward
    pass: a reentrant activation checkpoint runs each block's backward as a nested pass, and a
    callback queued from inside one would run (and reduce) once per block.
    """

    def __init__(self, ddp: DistributedDataParallel, ctx: DistContext) -> None:
        self.ddp, self.ctx = ddp, ctx
        _, self.params = split_parameters(ddp.module)
        self.queued = False
        ddp.register_forward_hook(self._at_forward)

    def _at_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self.queued = False  # also after a backward that raised before its end
        if not (self.ddp.require_backward_grad_sync and torch.is_grad_enabled()):
            return
        for leaf in tree_leaves(output):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                leaf.register_hook(self._at_output_grad)

    def _at_output_grad(self, grad: torch.Tensor) -> None:
        if not self.queued:
            self.queued = True
            # runs when the whole backward is done, on every rank (each rank's backward reaches its
            # experts: the exchange's backward is collective)
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce)

    def _reduce(self) -> None:
        self.queued = False
        expert_reduction(self.params, self.ctx)


@torch.no_grad()
def _broadcast_experts(model: nn.Module, ctx: DistContext) -> None:
    """What DDP's constructor does for the other parameters, for the experts: the first replica's
    values to every rank that holds the same experts."""
    if ctx.dp_size == 1:
        return
    src = dist.get_global_rank(ctx.dp_group, 0)
    expert_ids = expert_parameter_ids(model)
    for p in model.parameters():
        if id(p) in expert_ids:
            dist.broadcast(p, src, group=ctx.dp_group)  # NOTE: collective over the replicas


def data_parallel(model: nn.Module, ctx: DistContext, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Wraps ``model`` in DistributedDataParallel that is right for expert-parallel MoE layers.

    DDP broadcasts, buckets and averages the replicated parameters over the whole job (its usual
    work, overlapped with the backward); the experts and the routers' per-rank counts are left out of
    it, and the expert gradients are reduced at the end of each backward over ``ctx.dp_group``,
    divided by the world size. After ``loss.backward()`` every gradient equals what
    :func:`ep.sync_gradients` gives on the unwrapped model, so do not call it. ``no_sync()``
    accumulates locally (gradient accumulation); the next backward outside it reduces the sum.

    Args:
        model: the model (its MoE layers built with ``ep_group=ctx.ep_group``), on ``ctx.device``.
        ctx: the job's context.
        **ddp_kwargs: passed to DistributedDataParallel (e.g. ``bucket_cap_mb``,
            ``find_unused_parameters``); ``device_ids`` defaults to ``[ctx.device.index]`` on CUDA.

    Returns:
        The DistributedDataParallel module (``.module`` is ``model``).
    """
    if isinstance(model, DistributedDataParallel):
        raise ValueError("data_parallel: the model is wrapped in DistributedDataParallel already; pass "
                         "the unwrapped model")
    ignore = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(_per_rank_names(model))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignore))
    if ctx.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [ctx.device.index])
    _broadcast_experts(model, ctx)
    ddp = DistributedDataParallel(model, **ddp_kwargs)
    setattr(ddp, REDUCES_EXPERTS, _ExpertGradients(ddp, ctx))
    return ddp
