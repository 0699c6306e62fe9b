"""Expert gradients of MoE layers that run inside a DistributedDataParallel which ignores them.

Any DDP wrapper (``ep.data_parallel``, a user's own ``DistributedDataParallel``, the one that
Hugging Face Trainer or accelerate builds) can train an expert-parallel model right when the model's
root lists the expert parameters in ``_ddp_params_and_buffers_to_ignore`` (DDP's own mechanism;
``ep.prepare_ddp`` and ``ep.hf.expert_parallelize`` set it): DDP then neither broadcasts them nor
averages their gradients. Their reduction is done here instead: a layer that runs inside a DDP
forward with gradient synchronisation on (outside ``no_sync()``) queues it for the end of the
backward, summed over the ranks that hold the same experts and divided by DDP's world size, as
``ep.sync_gradients`` does.

A layer's reduction runs once per backward, when the outermost autograd pass that reaches the
layer ends, however many times the layer ran in the forward and under whatever activation
checkpointing. It is queued (``queue_callback``) on the first pass that meets the layer: the pass
that its output's gradient reaches, or, for a layer recomputed inside a backward (a checkpointed
block), the pass that runs the recomputation. A reentrant checkpoint recomputes in the pass around
the nested pass that then computes the block's gradients, so a callback queued at the nested pass's
arrival would run at that pass's end, once per checkpointed call of the layer: each later one would
reduce a sum of reduced and unreduced gradients. (Per layer, a flag all-reduce and bucketed gradient
all-reduces, after the backward rather than overlapped with it.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from ..ops.private import current_graph_task_id, queue_callback
from .grads import expert_reduction_over


@dataclass(frozen=True)
class ExpertReplicas:
    """Where a layer's expert gradients are reduced: over ``group`` (the ranks holding the same
    experts; None: the default group), divided by ``world_size`` (DDP's divide factor)."""

    group: ProcessGroup | None
    world_size: int


class LayerSync:
    """One layer's state: whether its reduction is queued in the running backward."""

    def __init__(self) -> None:
        self.queued = False

    def reset(self) -> None:
        """At a forward: a backward that raised before its end leaves nothing queued."""
        self.queued = False

    def reduce_at_end_of_backward(self, params: list[nn.Parameter], replicas: ExpertReplicas,
                                  output: Tensor) -> None:
        """Queues the reduction of ``params`` (the layer's experts) once, for the end of the outermost
        autograd pass that reaches ``output`` (a tensor the layer returned): now, for a
        recomputation inside a backward (activation checkpointing: that pass is the running one, or
        for a reentrant checkpoint the one around the nested pass that will compute the gradients),
        else when ``output``'s gradient arrives (nothing if it takes none). A layer called several
        times in one backward is reduced once."""

        def reduce() -> None:
            self.queued = False
            expert_reduction_over(params, replicas.group, replicas.world_size)  # NOTE: collective

        def queue() -> None:
            # every rank's backward meets the layer alike (the exchange's backward is collective)
            if not self.queued:
                self.queued = True
                queue_callback(reduce)

        if current_graph_task_id() != -1:  # a recomputation, inside a backward
            queue()
        elif output.requires_grad:
            output.register_hook(lambda grad: queue())


def ddp_world_size(ddp: nn.Module) -> int:
    """The number of ranks a DistributedDataParallel averages over."""
    return dist.get_world_size(getattr(ddp, "process_group", None))
