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

from ..comm.grads import is_sharded
from ..join import join


def generate_in_join(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """transformers' own ``generate`` of ``model``, inside ``ep.join`` (``model.generate`` of an
    ``ep.hf`` model). A sharded model (``ep.fully_shard``: every forward all-gathers over the job,
    which ep.join cannot serve) is left to transformers, which runs it with ``synced_gpus`` (dummy
    forwards) by itself."""
    generate: Any = getattr(type(model), "generate")  # noqa: B009 (transformers' own, of the class)
    if is_sharded(model):
        return generate(model, *args, **kwargs)
    with join(model):
        return generate(model, *args, **kwargs)
