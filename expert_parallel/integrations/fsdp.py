"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models holding expert-parallel MoE layers.

``ep.fully_shard`` shards every parameter: the replicated ones (embeddings, attention, routers,
shared experts) over the whole job, each MoE's experts over the ranks that hold the same experts
(``ctx.mesh["dp"]``), on top of their expert-parallel split. Units: the experts of each MoE are one
FSDP unit; each block (below) is one; the root takes what is left.

Gradient scale. FSDP2 averages a unit's gradients over its mesh. For the replicated parameters that
is the world, as ``ep.sync_gradients`` does. For the experts the target is the sum over the dp
replicas divided by the *world* size (docs/expert_parallel.md, "The gradient math"), so the expert
units' divide factor is the world size; on gloo, which has no PREMUL_SUM, they reduce with SUM and
divide after (``set_force_sum_reduction_for_comms``). With one replica (dp size 1) an expert unit
communicates nothing; its divide factor stays 1 and an all-reduce hook divides by the world size
(FSDP2 would otherwise divide twice for some reduce dtypes, fp16 among them).
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
from ..comm.grads import check_expert_layout
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
    if ctx.dp_size == 1:
        # One replica, no communication. torch 2.13's FSDP2 divides a one-rank unit's gradients by a
        # custom divide factor twice when its reduce dtype (the policy's reduce_dtype, else its
        # param_dtype, else the gradients' own) is neither fp32 nor bf16 (fp16: x0.5 at EP 2), and
        # twice under a forced SUM: keep its factor at 1 and divide in the hook it runs on the result.
        world = float(ctx.world_size)

        def divide(grad: torch.Tensor) -> None:
            grad.div_(world)

        unit.set_all_reduce_hook(divide)
        return
    unit.set_gradient_divide_factor(float(ctx.world_size))
    # gloo has no PREMUL_SUM: reduce with SUM and divide after.
    if dist.get_backend(mesh.get_group()) == "gloo" and hasattr(unit, "set_force_sum_reduction_for_comms"):
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
        mp_policy: FSDP2's MixedPrecisionPolicy (e.g. bf16 parameters, fp32 reduction); any
            reduce dtype, fp16 included, at any dp size. With one replica of the experts (dp size 1)
            their units' all-reduce hook (``set_all_reduce_hook``) does their division: leave it.
        reshard_after_forward: free the gathered parameters after the forward (FSDP2's option).
        blocks: the modules to make units of, instead of the ones found.

    Returns:
        The model, now an FSDPModule.
    """
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("fully_shard: the model is sharded already (it holds an FSDPModule)")
    check_expert_layout(model, ctx, "fully_shard")
    # the library's job-wide group (made once by init_distributed), not the default group, which a
    # user's own collectives use
    world = DeviceMesh.from_group(ctx.world_group, ctx.device.type)
    options = _Options(mp_policy or MixedPrecisionPolicy(), reshard_after_forward)
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        _experts_unit(moe, ctx, options)
    for block in (find_blocks(model) if blocks is None else list(blocks)):
        if block is not model:
            options.shard(block, world)
    options.shard(model, world)
    return model
