"""Gradient synchronisation and global gradient norms under EP x DP.

Rank r computes loss_r on its own tokens. Target: every gradient equals the single-device gradient of
L = (1/W) Σ_r loss_r over the world of W ranks.

- Non-expert parameter (router, embeddings, ...): rank r's backward gives ∂loss_r/∂θ, so
  grad = (1/W) Σ_r ∂loss_r/∂θ: all-reduce SUM over the world, divided by W.
- Expert parameter: the all-to-all backward already brings every token's gradient to the rank that
  owns the expert, so rank q's local gradient is Σ_{r in its EP group} ∂loss_r/∂w. The ranks holding
  the same experts form the DP group, so grad = (1/W) Σ_{DP group} (local grad): all-reduce SUM over
  the DP group, divided by W (not by dp_size: the 1/ep_size is what keeps the scale independent of
  the expert-parallel size).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..ops.experts import GroupedExperts
from ..ops.routing import TopKRouter
from .distributed import DistContext


def expert_parameter_ids(model: nn.Module) -> set[int]:
    """ids of every expert parameter (inside a GroupedExperts), trainable or frozen: each rank holds
    its own, so no wrapper may broadcast or average them over the job."""
    return {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(non-expert, expert) trainable parameters of ``model``; expert = inside a GroupedExperts."""
    expert_ids = expert_parameter_ids(model)
    shared: list[nn.Parameter] = []
    expert: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (expert if id(p) in expert_ids else shared).append(p)
    return shared, expert


def _with_grad_anywhere(params: list[nn.Parameter], group: ProcessGroup | None) -> list[nn.Parameter]:
    """The parameters that have a gradient on at least one rank of ``group``.

    A parameter no rank used keeps ``grad=None``, as in single-device training, so optimizers skip it
    (a zero gradient would still let AdamW decay and move it).
    """
    if not params:
        return []
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)  # NOTE: collective (one flag per param)
    return [p for p, flag in zip(params, has.tolist(), strict=True) if flag]  # NOTE: host-device sync


# Gradients are reduced in buckets of about this many bytes (DDP's default bucket size): a flat copy
# of every gradient at once would double the gradient memory.
BUCKET_BYTES = 25 * 2**20


def buckets(tensors: list[Tensor], max_bytes: int = BUCKET_BYTES) -> list[list[Tensor]]:
    """Consecutive tensors of one dtype, in groups of at most ``max_bytes`` (a larger tensor alone)."""
    groups: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if groups and groups[-1][0].dtype == t.dtype and size + nbytes <= max_bytes:
            groups[-1].append(t)
            size += nbytes
        else:
            groups.append([t])
            size = nbytes
    return groups


def _all_reduce_grads(params: list[nn.Parameter], group: ProcessGroup | None, scale: float) -> None:
    """grad <- scale * Σ_group grad, one all-reduce per bucket of gradients of one dtype."""
    grads: list[Tensor] = []
    for p in _with_grad_anywhere(params, group):
        if p.grad is None:  # another rank has one: every rank must send the same buffers
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    grads.sort(key=lambda g: str(g.dtype))  # stable: the same order on every rank
    for bucket in buckets(grads, BUCKET_BYTES):
        in_place = len(bucket) == 1 and bucket[0].is_contiguous()
        flat = bucket[0].view(-1) if in_place else torch.cat([g.reshape(-1) for g in bucket])
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)  # NOTE: collective
        flat.mul_(scale)
        if not in_place:
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (its ``module``), or the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def expert_reduction_over(params: list[nn.Parameter], group: ProcessGroup | None, world_size: int) -> None:
    """Expert gradients: summed over ``group`` (the ranks holding the same experts), divided by the
    world size."""
    _all_reduce_grads(params, group, 1.0 / world_size)


def sync_gradients(model: nn.Module, ctx: DistContext) -> None:
    """After backward: makes every gradient the single-device gradient of the mean per-rank loss.

    Non-expert gradients are averaged over the world; expert gradients are summed over the ranks that
    hold the same experts (ctx.dp_group) and divided by the world size. A parameter that has a
    gradient on some rank gets one everywhere (zeros where it had none, then the sum); a parameter
    with no gradient on any rank keeps ``grad=None``. Every rank must call it. Gradients are reduced
    in buckets of about 25 MiB (``BUCKET_BYTES``).

    Raises:
        ValueError: ``model`` is a DistributedDataParallel, whose backward reduced them already.
    """
    if isinstance(model, DistributedDataParallel):
        raise ValueError("sync_gradients: this model is wrapped in DistributedDataParallel (ep.data_parallel "
                         "or any DDP of a model after ep.prepare_ddp), whose backward already reduced every "
                         "gradient; call the optimizer directly")
    if is_sharded(model):
        raise ValueError("sync_gradients: this model is sharded (ep.fully_shard), whose backward already "
                         "reduced every gradient; call the optimizer directly")
    shared, expert = split_parameters(model)
    _all_reduce_grads(shared, None, 1.0 / ctx.world_size)
    expert_reduction_over(expert, ctx.dp_group, ctx.world_size)


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensor shards (FSDP2, ``ep.fully_shard``)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_part(t: Tensor) -> Tensor:
    """This rank's values of a tensor: a DTensor's local shard (sharing its storage), else itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def grad_norm(model: nn.Module, ctx: DistContext, norm_type: float = 2.0) -> Tensor:
    """The global gradient norm of the single-device model, each expert counted once.

    Call after :func:`sync_gradients` (then non-expert gradients agree on all ranks and expert
    gradients agree across the DP group), or after the backward of a ``data_parallel`` or
    ``fully_shard`` model. Returns the same value on every rank.
    """
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"norm_type={norm_type} is invalid: expected 2.0 or math.inf")
    shared, expert = split_parameters(model)
    device = next(model.parameters()).device
    op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM

    def local(params: list[nn.Parameter]) -> Tensor:
        grads = [local_part(p.grad.detach()).float() for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=device)
        if norm_type == math.inf:
            return torch.stack([g.abs().max() for g in grads]).max()
        return torch.stack([g.square().sum() for g in grads]).sum()

    if is_sharded(model):  # every element of the model lives in exactly one rank's shards
        total = local(shared + expert)
        if ctx.world_size > 1:
            dist.all_reduce(total, op=op)  # NOTE: collective over the world
        return total if norm_type == math.inf else total.sqrt()
    shared_part, expert_part = local(shared), local(expert)
    if ctx.ep_size > 1:
        dist.all_reduce(expert_part, op=op, group=ctx.ep_group)  # NOTE: collective
    if norm_type == math.inf:
        return torch.maximum(shared_part, expert_part)
    return (shared_part + expert_part).sqrt()


def clip_grad_norm_(model: nn.Module, max_norm: float, ctx: DistContext,
                    norm_type: float = 2.0) -> Tensor:
    """Scales all gradients so that the global norm (:func:`grad_norm`) is at most ``max_norm``.

    Returns the norm before clipping, like ``torch.nn.utils.clip_grad_norm_``.
    """
    total = grad_norm(model, ctx, norm_type)
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            local_part(p.grad).mul_(factor.to(p.grad.dtype))
    return total


def update_expert_bias(model: nn.Module, ctx: DistContext | None = None) -> None:
    """Aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3): once per optimizer step, after
    :func:`sync_gradients`, every router with an ``expert_bias`` moves it towards balance.

    The selected assignments that the training forwards since the last call counted are summed over
    every rank of the job (all layers in one all-reduce), then ``b_i += rate · sign(mean(c) - c_i)``
    with the router's ``bias_update_rate`` (``MoEConfig.bias_update_rate``), and the counts restart
    from zero. Every rank ends with the same bias. Every rank must call it (``ctx`` None: one
    process).
    """
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.expert_load is not None]
    if not routers:
        return
    loads = torch.stack([r.expert_load for r in routers if r.expert_load is not None])
    if ctx is not None and ctx.world_size > 1:
        dist.all_reduce(loads)  # NOTE: collective over the whole job: every rank's tokens
    for router, load in zip(routers, loads.double(), strict=True):
        assert router.expert_bias is not None and router.expert_load is not None
        step = torch.sign(load.mean() - load) * float(router.bias_update_rate or 0.0)
        router.expert_bias += step.to(router.expert_bias.dtype)
        router.expert_load.zero_()
