"""expert_parallel: sparse Mixture-of-Experts layers with experts sharded across processes.

Shape suffixes (a tensor's name ends in the letters of its dimensions):
    B batch, L sequence length, D model dim, F expert hidden dim, T tokens (B*L, or a rank's local
    tokens), G routing groups, S tokens per group, E experts (global), e experts on this rank,
    K top-k, C capacity (slots per expert per group), N routed token copies (rows), n rows on this
    rank's experts, M assignments before drops, R ranks in the expert-parallel group.
"""

from . import checkpoint
from .checkpoint import (
    export_single_device,
    import_single_device,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import MoEConfig
from .deepspeed_support import prepare_for_deepspeed
from .dispatch import CommReport
from .distributed import DistContext, LaunchEnv, detect_launcher, init_distributed, launch_env
from .exchange import CollectiveError
from .experts import FeedForward
from .grads import clip_grad_norm_, grad_norm, sync_gradients
from .layer import MoE, configure_debug
from .losses import MoEAux
from .routing import (
    ExpertChoiceOutput,
    ExpertChoiceRouter,
    NoisyTopKRouter,
    Router,
    SoftOutput,
    SoftRouter,
    TopKOutput,
    TopKRouter,
    check_causal_routing,
)

__version__ = "0.1.0"

__all__ = [
    "CollectiveError",
    "CommReport",
    "DistContext",
    "ExpertChoiceOutput",
    "ExpertChoiceRouter",
    "FeedForward",
    "LaunchEnv",
    "MoE",
    "MoEAux",
    "MoEConfig",
    "NoisyTopKRouter",
    "Router",
    "SoftOutput",
    "SoftRouter",
    "TopKOutput",
    "TopKRouter",
    "__version__",
    "check_causal_routing",
    "checkpoint",
    "clip_grad_norm_",
    "configure_debug",
    "detect_launcher",
    "export_single_device",
    "grad_norm",
    "import_single_device",
    "init_distributed",
    "latest_checkpoint",
    "launch_env",
    "load_checkpoint",
    "prepare_for_deepspeed",
    "save_checkpoint",
    "sync_gradients",
]
