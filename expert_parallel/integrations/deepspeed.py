"""Training our MoE under DeepSpeed's engine (ZeRO stages 1 and 2).

DeepSpeed's engine reduces expert gradients over its expert-data-parallel groups only for parameters
it knows to be expert parameters (``param.allreduce = False``, ``param.group_name``) in optimizer
param groups marked ``moe``, and only when it finds a ``deepspeed.moe.layer.MoE`` in the model. So
``prepare_for_deepspeed``:

1. gives each of our MoE layers a class that is also a ``deepspeed.moe.layer.MoE`` (our forward and
   state-dict keys are unchanged), whose ``set_deepspeed_parallelism`` (called by the engine) creates
   DeepSpeed's expert groups and checks that they are ours;
2. marks every expert parameter the way ``deepspeed.moe.utils.is_moe_param`` reads it;
3. returns the optimizer param groups from DeepSpeed's own
   ``split_params_into_different_moe_groups_for_optimizer``.

DeepSpeed then averages non-expert gradients over the world and sums expert gradients over the
ranks that hold the same experts divided by the world size, the same math as ``sync_gradients``.
Do not call ``sync_gradients`` on top of the engine.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from ..comm.distributed import DistContext
from ..layer import MoE


def _check_groups(module: Any) -> None:
    """Creates DeepSpeed's expert groups (if needed) and checks they match our process groups."""
    from deepspeed.utils import groups

    ctx: DistContext = module.ep_context
    name = module.expert_group_name
    if name not in groups._get_expert_parallel_group_dict():
        # The same call DeepSpeed's own MoE layer makes: consecutive ranks per expert-parallel group.
        groups._create_expert_and_data_parallel(ctx.ep_size)  # NOTE: collective (new_group)
    theirs = (dist.get_process_group_ranks(groups._get_expert_parallel_group(name)),
              dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name)))
    ours = (dist.get_process_group_ranks(ctx.ep_group), dist.get_process_group_ranks(ctx.dp_group))
    if [list(r) for r in theirs] != [list(r) for r in ours]:
        raise RuntimeError(f"DeepSpeed's expert groups (ep {theirs[0]}, expert-dp {theirs[1]}) differ "
                           f"from expert_parallel's (ep {ours[0]}, dp {ours[1]})")


def _deepspeed_visible(cls: type) -> type:
    """``cls`` (a subclass of our MoE) that is also a deepspeed.moe.layer.MoE for the engine."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    def set_deepspeed_parallelism(self: Any, use_data_before_expert_parallel_: bool = False,
                                  **_: Any) -> None:
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel is not supported: expert_parallel "
                             "puts consecutive ranks in an expert-parallel group")
        _check_groups(self)

    # Our class first in the MRO: forward, state_dict and everything else stay ours.
    return type(cls.__name__, (cls, DeepSpeedMoE), {
        "set_deepspeed_parallelism": set_deepspeed_parallelism, "__module__": cls.__module__})


def prepare_for_deepspeed(model: nn.Module, ctx: DistContext) -> list[dict[str, Any]]:
    """Makes ``model``'s MoE layers known to DeepSpeed; returns the optimizer param groups.

    Use the returned groups for the optimizer given to ``deepspeed.initialize`` (ZeRO stage 1 or 2):

        groups = ep.prepare_for_deepspeed(model, ctx)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=...),
                                          config=ds_config)
    """
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    group_name = f"ep_size_{ctx.ep_size}"
    for module in model.modules():
        if isinstance(module, MoE):
            if not isinstance(module, DeepSpeedMoE):
                module.__class__ = _deepspeed_visible(type(module))
            # The attributes DeepSpeed reads from its MoE layers (plain values, not submodules).
            module.__dict__.update(ep_context=ctx, expert_group_name=group_name,
                                   num_experts=module.cfg.num_experts,
                                   num_local_experts=module.experts.num_local)
            for p in module.experts.parameters():
                p.allreduce = False  # type: ignore[attr-defined]
                p.group_name = group_name  # type: ignore[attr-defined]
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = split_params_into_different_moe_groups_for_optimizer(
        {"params": params, "name": "params"})
    return groups
