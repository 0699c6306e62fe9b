"""The expert-parallel command. Its sub-commands: demo (one MoE block trained on random data),
train (the MoE language model), compare (dense vs MoE variants), bench (forward+backward time against
the floor and DeepSpeed), compose (the language model under sync_gradients, DDP, FSDP2 and activation
checkpointing: bytes held, step time, peak memory), finetune-hf (a Hugging Face MoE model,
expert-parallel), scaling (flat vs hierarchical exchange on a multi-node job), plan-cluster (the
cluster cost model) and info (versions and devices). Each runs as one process or under any launcher;
COMMAND --help lists its options."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch

from .. import __version__
from ..comm.distributed import default_backend, launch_env
from ..comm.shutdown import shutdown
from . import bench, compare, compose_bench, demo, finetune_hf, plan_cluster, scaling
from . import train as train_lm


def _version(module: str) -> str:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # not installed, or fails to import on this machine
        return "not installed"


def info() -> str:
    """Launcher, backend, devices and versions, for bug reports (starts no process group)."""
    launch = launch_env()
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "\n".join([
        f"expert_parallel {__version__}",
        f"launcher {launch.launcher} (rank {launch.rank} of {launch.world_size}, local rank "
        f"{launch.local_rank})",
        f"backend {default_backend(launch)} (default for this process)",
        f"cuda devices {cuda}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"deepspeed {_version('deepspeed')}",
        f"mpi4py {_version('mpi4py')}",
    ])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="expert-parallel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="train one MoE block on random data"))
    train_parser = sub.add_parser("train", help="train an MoE language model (expert-parallel)")
    train_lm.add_arguments(train_parser)
    compare_parser = sub.add_parser("compare", help="dense vs MoE variants at equal active parameters")
    compare.add_arguments(compare_parser)
    bench.add_arguments(sub.add_parser("bench", help="forward+backward time vs the floor and DeepSpeed"))
    compose_bench.add_arguments(sub.add_parser(
        "compose", help="the LM under sync_gradients, DDP, FSDP2, checkpointing: memory and time"))
    finetune_hf.add_arguments(sub.add_parser(
        "finetune-hf", help="fine-tune a Hugging Face MoE model expert-parallel (the hf extra)"))
    scaling.add_arguments(sub.add_parser(
        "scaling", help="flat vs hierarchical vs node-limited exchange on a multi-node job"))
    plan_cluster.add_arguments(sub.add_parser(
        "plan-cluster", help="predict all-to-all bytes and time on a cluster (cost model)"))
    sub.add_parser("info", help="print versions and devices")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    elif args.command == "train":
        train_lm.train(args)
    elif args.command == "compare":
        compare.compare(args)
    elif args.command == "bench":
        bench.bench(args)
    elif args.command == "compose":
        compose_bench.compose(args)
    elif args.command == "scaling":
        scaling.scaling(args)
    elif args.command == "plan-cluster":
        print(plan_cluster.plan(args))
    elif args.command == "finetune-hf":
        finetune_hf.finetune(args)
    else:
        demo.run(args)
    shutdown()  # a launched worker leaves here, skipping the teardown that can abort it
    return 0


if __name__ == "__main__":
    sys.exit(main())
