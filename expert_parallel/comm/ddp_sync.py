"""Expert gradients of MoE layers that run inside a DistributedDataParallel which ignores them.

Any DDP wrapper (``ep.data_parallel``, a user's own ``DistributedDataParallel``, the one that
Hugging Face Trainer or accelerate builds) can train an expert-parallel model right when the model's
root lists the expert parameters in ``_ddp_params_and_buffers_to_ignore`` (DDP's own mechanism;
``ep.prepare_ddp`` and ``ep.hf.expert_parallelize`` set it): DDP then neither broadcasts them nor
averages their gradients. Their reduction is done here instead: a layer that runs inside a DDP
forward with gradient synchronisation on (outside ``no_sync()``) queues it for the end of the
backward, summed over the ranks that hold the same experts and divided by DDP's world size, as
``ep.sync_gradients`` does.

A layer's reduction is queued when its output's gradient arrives and runs when the autograd pass
that computes its expert gradients ends: the whole backward, or, for a block under a reentrant
activation checkpoint, that block's nested pass (a callback queued for the outermost pass would
not know which layers a nested one reached). So each layer is reduced once per backward, on its own
(per layer, a flag all-reduce and bucketed gradient all-reduces, after the backward rather than
overlapped with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

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
        """Queues the reduction of ``params`` (the layer's experts) for the end of the autograd
        pass that reaches ``output`` (a tensor the layer returned; nothing if it takes no gradient).
        A layer called twice in one backward is reduced once."""
        if not output.requires_grad:
            return

        def reduce() -> None:
            self.queued = False
            expert_reduction_over(params, replicas.group, replicas.world_size)  # NOTE: collective

        def arrived(grad: Tensor) -> None:
            if not self.queued:
                self.queued = True
                # every rank's backward reaches the layer (the exchange's backward is collective)
                torch.autograd.Variable._execution_engine.queue_callback(reduce)

        output.register_hook(arrived)


def ddp_world_size(ddp: nn.Module) -> int:
    """The number of ranks a DistributedDataParallel averages over."""
    return dist.get_world_size(getattr(ddp, "process_group", None))
