"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models holding expert-parallel MoE layers.

``ep.fully_shard`` shards every parameter: the replicated ones (embeddings, attention, routers,
shared experts) over the whole job, each MoE's experts over the ranks that hold the same experts
(``ctx.mesh["dp"]``), on top of their expert-parallel split. Units: the experts of each MoE are one
FSDP unit; each block (below) is one; the root takes what is left.

Gradient scale. FSDP2 averages a unit's gradients over its mesh. For the replicated parameters that
is the world, as ``ep.sync_gradients`` does. For the experts the target is the sum over the dp
replicas divided by the *world* size (docs/expert_parallel.md, "The gradient math"), so the expert
units' divide factor is the world size; on gloo, which has no PREMUL_SUM, they reduce with SUM and
divide after (``set_force_sum_reduction_for_comms``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.fsdp import fully_shard as fsdp_fully_shard
from torch.distributed.tensor import Shard

from ..comm.distributed import DistContext
from ..layer import MoE


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a model: the entries of every ``nn.ModuleList`` that hold an MoE layer (the
    transformer layers of most models, e.g. ``model.layers``; Hugging Face's ``model.model.layers``);
    where no list holds one, each MoE layer itself."""
    depth = {id(m): name.count(".") + bool(name) for name, m in model.named_modules()}
    blocks: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(
                isinstance(m, MoE) for entry in module for m in entry.modules()):
            blocks += [entry for entry in module if entry not in blocks]
    if not blocks:
        blocks = [m for m in model.modules() if isinstance(m, MoE)]
    return sorted(blocks, key=lambda m: -depth[id(m)])  # innermost first: FSDP2 wraps bottom-up


@dataclass(frozen=True)
class _Options:
    """FSDP2's options common to every unit."""

    mp_policy: MixedPrecisionPolicy
    reshard_after_forward: bool

    def shard(self, module: nn.Module, mesh: DeviceMesh, dim: int | None = None) -> FSDPModule:
        placement = None if dim is None else (lambda _: Shard(dim))
        return fsdp_fully_shard(module, mesh=mesh, mp_policy=self.mp_policy, shard_placement_fn=placement,
                                reshard_after_forward=self.reshard_after_forward)


def _experts_unit(moe: MoE, ctx: DistContext, options: _Options) -> None:
    """The experts of one MoE: one FSDP unit over the dp replicas (dim 0 when there are at least as
    many local experts as replicas, else dim 1, so that every rank keeps a share), gradients summed
    over the replicas and divided by the world size."""
    mesh = ctx.mesh["dp"]
    unit = options.shard(moe.experts, mesh, 0 if moe.experts.num_local >= ctx.dp_size else 1)
    unit.set_gradient_divide_factor(float(ctx.world_size))
    # gloo has no PREMUL_SUM: reduce with SUM and divide after. Not on a one-rank mesh, where there is
    # no communication and torch 2.13's FSDP2 would divide twice under the forced SUM.
    gloo = dist.get_backend(mesh.get_group()) == "gloo"
    if gloo and ctx.dp_size > 1 and hasattr(unit, "set_force_sum_reduction_for_comms"):
        unit.set_force_sum_reduction_for_comms(True)


def fully_shard(model: nn.Module, ctx: DistContext, *, mp_policy: MixedPrecisionPolicy | None = None,
                reshard_after_forward: bool = True, blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """Shards ``model`` with FSDP2: every parameter, the experts also over their dp replicas.

    Units, innermost first: each MoE's experts (over ``ctx.mesh["dp"]``), each block (over the whole
    job; by default :func:`find_blocks`: the entries of the model's ``nn.ModuleList`` s that hold MoE
    layers), then the model itself (the rest: embeddings, head). After ``loss.backward()`` every
    gradient (a DTensor shard) equals, on its shard, what ``ep.sync_gradients`` gives on the
    unsharded model, so do not call it. FSDP2's own API works on the result:
    ``set_requires_gradient_sync(False)`` for gradient accumulation, ``unshard`` / ``reshard``.

    Args:
        model: the model, its MoE layers built with ``ep_group=ctx.ep_group``, on ``ctx.device``
            (or on the meta device: move it with ``to_empty`` after, then ``reset_parameters``).
        ctx: the job's context.
        mp_policy: FSDP2's MixedPrecisionPolicy (e.g. bf16 parameters, fp32 reduction).
        reshard_after_forward: free the gathered parameters after the forward (FSDP2's option).
        blocks: the modules to make units of, instead of the ones found.

    Returns:
        The model, now an FSDPModule.
    """
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("fully_shard: the model is sharded already (it holds an FSDPModule)")
    if ctx.dp_size == 1 and mp_policy is not None and mp_policy.reduce_dtype == torch.float16:
        # torch 2.13's FSDP2 divides a one-rank unit's fp16 gradients by a custom factor twice
        raise ValueError("fully_shard: mp_policy.reduce_dtype=torch.float16 with one replica of the "
                         "experts (dp_size 1) is not supported; reduce in float32 or bfloat16")
    group = dist.group.WORLD
    assert group is not None  # init_distributed made it
    world = DeviceMesh.from_group(group, ctx.device.type)  # the job's group, not a new one
    options = _Options(mp_policy or MixedPrecisionPolicy(), reshard_after_forward)
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        _experts_unit(moe, ctx, options)
    for block in (find_blocks(model) if blocks is None else list(blocks)):
        if block is not model:
            options.shard(block, world)
    options.shard(model, world)
    return model
