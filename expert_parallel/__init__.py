"""expert_parallel: sparse Mixture-of-Experts layers with experts sharded across processes.

Shape suffixes: a tensor's name ends in the letters of its dimensions (``x_BLD``, ``counts_Re``).
Each letter has one meaning across the package (tests/test_layering.py holds names to this legend):

    B  batch                                    L  sequence length
    D  model dim                                F  expert hidden dim
    T  tokens (B*L, or a rank's local tokens)   X  any leading dims of a router input
    G  routing groups                           S  tokens per routing group
    E  experts (global)                         e  experts on this rank
    K  top-k (experts per token)                C  capacity (slots per expert per group)
    J  soft-routing slots per group (E * slots_per_expert)
    M  token-choice assignments before drops (S*K in a group, G*S*K in all)
    N  routed rows: kept token copies (or soft slots)
    n  rows that this rank's experts run
    R  ranks in the expert-parallel group (one source per rank; R = 1 in one process)
    W  ranks in the whole job (world size)
    V  nodes spanned by the expert-parallel group (hierarchical exchange)
    U  unique (node, token) rows a rank sends to other nodes (hierarchical exchange)
    H  routed copies a node proxy forwards inside its node (hierarchical exchange)
    I  input width of a GEMM (D or F)           O  output width of a GEMM (D or F)

The code is layered, and a module imports only from the layers below it (tests/test_layering.py):
``config`` → ``ops`` (routing, plan, dispatch, experts, losses: math, no communication) →
``comm`` (distributed, exchange, grads: every collective) → ``layer`` (MoE) →
``integrations`` (checkpoint, deepspeed) → ``apps`` (the programs, with their own extra).
"""

from .comm.distributed import DistContext, LaunchEnv, detect_launcher, init_distributed, launch_env
from .comm.exchange import CollectiveError
from .comm.grads import clip_grad_norm_, grad_norm, sync_gradients, update_expert_bias
from .comm.shutdown import shutdown
from .config import MoEConfig
from .integrations import checkpoint
from .integrations.checkpoint import (
    export_single_device,
    import_single_device,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .integrations.ddp import data_parallel, prepare_ddp
from .integrations.deepspeed import prepare_for_deepspeed
from .integrations.fsdp import fully_shard
from .join import join
from .layer import MoE, configure_debug
from .ops.dispatch import CommReport
from .ops.experts import FeedForward
from .ops.losses import MoEAux
from .ops.routing import (
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


def __getattr__(name: str) -> object:
    # ep.hf is imported on first use: it needs transformers (the "hf" extra), the library does not.
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    "data_parallel",
    "detect_launcher",
    "export_single_device",
    "fully_shard",
    "grad_norm",
    "import_single_device",
    "init_distributed",
    "join",
    "latest_checkpoint",
    "launch_env",
    "load_checkpoint",
    "prepare_ddp",
    "prepare_for_deepspeed",
    "save_checkpoint",
    "shutdown",
    "sync_gradients",
    "update_expert_bias",
]
