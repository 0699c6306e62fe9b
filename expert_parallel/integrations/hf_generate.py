"""``generate()`` of an expert-parallel transformers model when ranks stop at different steps.

Each rank decodes its own prompts: one hits EOS first, or reaches ``max_length`` sooner, or was given
fewer ``max_new_tokens``. Every decoding step runs each MoE layer, a collective over the
expert-parallel group, so the rank that stopped would leave its peers waiting. ``ep.hf`` models run
``generate`` inside :func:`ep.join <expert_parallel.join.join>`: a rank that has finished serves its
peers' exchanges (zero rows of its own) until every rank has, with no argument from the user and
no extra forward of the dense layers (transformers' ``synced_gpus=True`` would run whole dummy
forwards instead; it still works, and so does passing it).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..join import join


class GenerateJoined:
    """``model.generate`` of an expert-parallel model: transformers' own, inside ``ep.join``. An
    object holding its model, not a bound method, so that a deepcopy of the model generates with
    the copy and the model still pickles."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generate: Any = getattr(type(self.model), "generate")  # noqa: B009 (transformers' own, of the class)
        if any(isinstance(m, FSDPModule) for m in self.model.modules()):
            # ep.fully_shard: every forward all-gathers over the job, which ep.join cannot serve;
            # transformers runs such a model with synced_gpus (dummy forwards) by itself
            return generate(self.model, *args, **kwargs)
        with join(self.model):
            return generate(self.model, *args, **kwargs)


def generate_joined(model: nn.Module) -> None:
    """Makes ``model.generate`` run inside ``ep.join`` (a model without ``generate``: nothing)."""
    if callable(getattr(type(model), "generate", None)):
        model.generate = GenerateJoined(model)  # type: ignore[assignment]
