"""DistributedDataParallel for models holding expert-parallel MoE layers: ``ep.prepare_ddp`` (any
DDP wrapper) and ``ep.data_parallel`` (ours).

Plain ``DistributedDataParallel(model)`` is wrong for them: its constructor broadcasts rank 0's
parameters, so every rank's experts become rank 0's, and its reducer then averages the gradients of
different experts over the whole world. ``prepare_ddp`` lists the experts (and the routers'
per-rank counts) in the model's ``_ddp_params_and_buffers_to_ignore``, DDP's own switch, read by
every DDP constructor, so DDP broadcasts, buckets and averages only the replicated parameters; each
MoE layer reduces its experts' gradients itself at the end of every backward of a forward that ran
inside a DDP with gradient synchronisation on (``comm/ddp_sync.py``): summed over the ranks that hold
the same experts (``ctx.dp_group``) and divided by the world size, as ``ep.sync_gradients`` does.
DDP's ``no_sync()`` skips both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..comm.ddp_sync import ExpertReplicas
from ..comm.distributed import DistContext
from ..comm.grads import check_expert_layout, expert_parameter_ids
from ..layer import MoE
from ..ops.private import ddp_ignored_names, set_ddp_ignored
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


def prepare_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Makes every DistributedDataParallel wrapper of ``model`` right for its expert-parallel layers.

    After it, ``DistributedDataParallel(model)`` — yours, or the one Hugging Face Trainer or
    accelerate builds — leaves the experts alone (no broadcast from rank 0, no
    averaging over the world) and each MoE layer reduces its experts' gradients at the end of the
    backward: summed over ``ctx.dp_group``, divided by the world size. After ``loss.backward()``
    every gradient equals what :func:`ep.sync_gradients` gives on the unwrapped model, so do not
    call it. ``no_sync()`` accumulates locally; the next backward outside it reduces the sum.

    It sets the model's ``_ddp_params_and_buffers_to_ignore`` (DDP reads it from the module it
    wraps: wrap this very module, not a parent) and broadcasts the experts over their replicas.
    ``ep.hf.expert_parallelize`` and ``ep.hf.from_pretrained`` call it. Every rank calls it.

    Returns:
        ``model``, changed in place.
    """
    if isinstance(model, DistributedDataParallel):
        raise ValueError("prepare_ddp: the model is wrapped in DistributedDataParallel already (whose "
                         "constructor overwrote the experts); call it on the unwrapped model, before "
                         "wrapping")
    check_expert_layout(model, ctx, "prepare_ddp")
    ignore = set(ddp_ignored_names(model)) | set(_per_rank_names(model))
    set_ddp_ignored(model, ignore)
    replicas = ExpertReplicas(ctx.dp_group, ctx.world_size)
    for module in model.modules():
        if isinstance(module, MoE):
            module.ddp_replicas = replicas
    _broadcast_experts(model, ctx)
    return model


def data_parallel(model: nn.Module, ctx: DistContext, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Wraps ``model`` in DistributedDataParallel that is right for expert-parallel MoE layers:
    :func:`prepare_ddp`, then ``DistributedDataParallel(model, **ddp_kwargs)``.

    DDP broadcasts, buckets and averages the replicated parameters over the whole job (its usual
    work, overlapped with the backward); the experts and the routers' per-rank counts are left out of
    it, and the expert gradients are reduced at the end of each backward over ``ctx.dp_group``,
    divided by the world size. After ``loss.backward()`` every gradient equals what
    :func:`ep.sync_gradients` gives on the unwrapped model, so do not call it. ``no_sync()``
    accumulates locally (gradient accumulation); the next backward outside it reduces the sum.
    A rank may hold no tokens (every parameter still takes part, with a zero gradient); a layer
    called several times in a forward, checkpointed or not, is reduced once per backward (with
    reentrant checkpointing of such a layer, DDP itself needs ``static_graph=True``).

    Args:
        model: the model (its MoE layers built with ``ep_group=ctx.ep_group``), on ``ctx.device``.
        ctx: the job's context.
        **ddp_kwargs: passed to DistributedDataParallel (e.g. ``bucket_cap_mb``,
            ``find_unused_parameters``); ``device_ids`` defaults to ``[ctx.device.index]`` on CUDA,
            ``process_group`` to ``ctx.world_group`` (the library's job-wide group).

    Returns:
        The DistributedDataParallel module (``.module`` is ``model``).
    """
    if isinstance(model, DistributedDataParallel):
        raise ValueError("data_parallel: the model is wrapped in DistributedDataParallel already; pass "
                         "the unwrapped model")
    prepare_ddp(model, ctx)
    if ctx.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [ctx.device.index])
    # the library's own job-wide group: a user's collective on the default group never pairs with
    # DDP's bucket all-reduces, whatever order the ranks run them in
    ddp_kwargs.setdefault("process_group", ctx.world_group)
    return DistributedDataParallel(model, **ddp_kwargs)
