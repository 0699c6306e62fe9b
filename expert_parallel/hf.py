"""``ep.hf``: Hugging Face transformers MoE models, expert-parallel (the ``hf`` extra).

See :mod:`expert_parallel.integrations.hf` and docs/hf.md.
"""

from typing import Any

from .integrations.hf import (
    FAMILIES,
    ExpertParallelBlock,
    expert_parallelize,
    from_pretrained,
)
from .integrations.hf_export import hf_state_dict, save_pretrained


def __getattr__(name: str) -> Any:
    # transformers.Trainer's callback is imported on first use: it imports transformers' trainer
    # (and accelerate), which the model conversions do not need.
    if name == "ExpertParallelCallback":
        from .integrations.hf_trainer import ExpertParallelCallback

        return ExpertParallelCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FAMILIES", "ExpertParallelBlock", "ExpertParallelCallback", "expert_parallelize",  # noqa: F822
           "from_pretrained", "hf_state_dict", "save_pretrained"]
