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

from ..ops.routing import TopKRouter
from .distributed import DistContext


def expert_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE layers of ``model``: modules marked ``expert_parallel_layer`` (``ep.MoE`` sets it),
    whose ``experts`` hold this rank's share of the experts."""
    return [m for m in model.modules() if getattr(type(m), "expert_parallel_layer", False)]


def expert_parameter_ids(model: nn.Module) -> set[int]:
    """ids of every expert parameter (anything under an MoE layer's ``experts``, whatever module that
    is), trainable or frozen: each rank holds its own, so no wrapper may broadcast or average them
    over the job."""
    return {id(p) for m in expert_layers(model) for p in m.get_submodule("experts").parameters()}


def check_expert_layout(model: nn.Module, ctx: DistContext, what: str) -> None:
    """Raises ValueError unless every MoE layer of ``model`` splits its experts over the job's
    expert-parallel group (``ctx.ep_group``): the experts of a layer built without it (or with
    another group) are not where the reductions over ``ctx.dp_group`` assume them, and their
    gradients would silently differ between ranks. Layers of one rank each are the same thing at
    ``ctx.ep_size`` 1."""
    want = dist.get_process_group_ranks(ctx.ep_group) if ctx.ep_size > 1 else None
    for layer in expert_layers(model):
        size = int(getattr(layer, "ep_size", 1))
        group = getattr(layer, "ep_group", None)
        have = dist.get_process_group_ranks(group) if size > 1 and group is not None else None
        if have != want:
            name = getattr(layer, "layer_name", type(layer).__name__)
            where = have or "no ranks (all experts on each rank)"
            raise ValueError(f"{what}: MoE layer {name!r} splits its experts over {where}, "
                             f"but the job's expert-parallel group (ctx.ep_group, ep_size {ctx.ep_size}) is "
                             f"{want or 'one rank'}: build every MoE with ep.MoE(cfg, ep_group=ctx.ep_group) "
                             f"(ep.hf.expert_parallelize does), so that its experts are reduced right")


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(non-expert, expert) trainable parameters of ``model``; expert = under an MoE's ``experts``."""
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
    check_expert_layout(model, ctx, "sync_gradients")
    shared, expert = split_parameters(model)
    _all_reduce_grads(shared, ctx.world_group, 1.0 / ctx.world_size)
    expert_reduction_over(expert, ctx.dp_group, ctx.world_size)


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensor shards (FSDP2, ``ep.fully_shard``)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_part(t: Tensor) -> Tensor:
    """This rank's values of a tensor: a DTensor's local shard (sharing its storage), else itself."""
    return t.to_local() if isinstance(t, DTensor) else t


# grad_norm reads a gradient in pieces of at most this many elements: where a reduction in fp32 of a
# low-precision tensor makes an fp32 copy first (the CPU kernels), at most one piece's copy (16 MiB)
# is alive at a time; the GPU kernels accumulate in fp32 without one.
NORM_PIECE = 2**22


def _pieces(t: Tensor) -> list[Tensor]:
    """``t`` as views of at most NORM_PIECE elements (a non-contiguous tensor whole)."""
    if t.numel() <= NORM_PIECE or not t.is_contiguous():
        return [t]
    return list(t.view(-1).split(NORM_PIECE))


def _piece_norm(piece: Tensor, norm_type: float) -> Tensor:
    """max |piece| (norm_type inf) or Σ piece², in fp32. On the CPU the sum of squares is taken
    over a squared fp32 copy of the piece: torch's CPU fp32 norm kernel accumulates sequentially
    (4e-5 relative error on 2**20 bf16 values, against 1e-9 for the pairwise ``sum``)."""
    if norm_type == math.inf:
        return torch.linalg.vector_norm(piece, math.inf, dtype=torch.float32)
    if piece.device.type != "cpu":
        return torch.linalg.vector_norm(piece, dtype=torch.float32).square()
    return piece.to(torch.float32, copy=True).square_().sum()


def _local_norm(grads: list[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """fp32 max |g| (norm_type inf) or Σ g² over ``grads`` (this rank's parts), streamed: one
    fp32 result per piece, never an fp32 copy of more than one piece at a time."""
    parts = [_piece_norm(piece, norm_type) for g in grads for piece in _pieces(local_part(g.detach()))]
    if not parts:
        return torch.zeros((), device=device)
    stacked = torch.stack([part.to(device) for part in parts])
    return stacked.max() if norm_type == math.inf else stacked.sum()


def grad_norm(model: nn.Module, ctx: DistContext, norm_type: float = 2.0) -> Tensor:
    """The global gradient norm of the single-device model, each expert counted once (fp32).

    Call after :func:`sync_gradients` (then non-expert gradients agree on all ranks and expert
    gradients agree across the DP group), or after the backward of a ``data_parallel`` or
    ``fully_shard`` model. Returns the same value on every rank. Streamed: per-piece norms in fp32
    (:data:`NORM_PIECE`), so bf16 gradients never get an fp32 copy all at once.
    """
    if norm_type not in (2.0, math.inf):
        raise ValueError(f"norm_type={norm_type} is invalid: expected 2.0 or math.inf")
    check_expert_layout(model, ctx, "grad_norm")
    shared, expert = split_parameters(model)
    device = next(model.parameters()).device
    op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM

    def local(params: list[nn.Parameter]) -> Tensor:
        return _local_norm([p.grad for p in params if p.grad is not None], norm_type, device)

    if is_sharded(model):  # every element of the model lives in exactly one rank's shards
        total = local(shared + expert)
        if ctx.world_size > 1:
            dist.all_reduce(total, op=op, group=ctx.world_group)  # NOTE: collective over the job
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
        dist.all_reduce(loads, group=ctx.world_group)  # NOTE: collective over the job: every rank's tokens
    for router, load in zip(routers, loads.double(), strict=True):
        assert router.expert_bias is not None and router.expert_load is not None
        step = torch.sign(load.mean() - load) * float(router.bias_update_rate or 0.0)
        router.expert_bias += step.to(router.expert_bias.dtype)
        router.expert_load.zero_()
