"""``ep.hf``: Hugging Face transformers MoE models, expert-parallel (the ``hf`` extra).

See :mod:`expert_parallel.integrations.hf` and docs/hf.md.
"""

from .integrations.hf import (
    FAMILIES,
    ExpertParallelBlock,
    expert_parallelize,
    from_pretrained,
    hf_state_dict,
    save_pretrained,
)

__all__ = ["FAMILIES", "ExpertParallelBlock", "expert_parallelize", "from_pretrained", "hf_state_dict",
           "save_pretrained"]
