"""The ``expert-parallel`` command: ``demo`` (the single-process demo run) and ``info``."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

import torch

from .. import __version__
from ..comm.distributed import default_backend, launch_env
from . import bench, compare, demo, finetune_hf, plan_cluster, scaling
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
    parser = argparse.ArgumentParser(prog="expert-parallel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="train one MoE block on random data"))
    train_parser = sub.add_parser("train", help="train an MoE language model (expert-parallel)")
    train_lm.add_arguments(train_parser)
    compare_parser = sub.add_parser("compare", help="dense vs MoE variants at equal active parameters")
    compare.add_arguments(compare_parser)
    bench.add_arguments(sub.add_parser("bench", help="forward+backward time vs the floor and DeepSpeed"))
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
    elif args.command == "scaling":
        scaling.scaling(args)
    elif args.command == "plan-cluster":
        print(plan_cluster.plan(args))
    elif args.command == "finetune-hf":
        finetune_hf.finetune(args)
    else:
        demo.run(args)
    _end_job()
    return 0


def _end_job() -> None:
    """Ends the process group; in a launched job, also the process, skipping interpreter teardown.

    Process groups outlive ``destroy_process_group`` while anything still references them (the
    model's layers, DeepSpeed's group registry), and destroying them during interpreter teardown
    sometimes aborts a finished worker with SIGABRT ("terminate called without an active
    exception"): 1 run in 10 of the demo under the DeepSpeed launcher here, which the launcher
    reports as a failed job. Every file the command wrote is closed by now, so a launched worker
    flushes its output and exits at once. Without a launcher (tests, one process) it returns.
    """
    launched = torch.distributed.is_available() and torch.distributed.is_initialized() and (
        launch_env().launcher != "none")
    _destroy_process_group()
    if launched:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _destroy_process_group() -> None:
    """Ends the process group the command started, while the interpreter is still whole: left to
    interpreter teardown, gloo's worker threads (e.g. of an ``async_op`` all-to-all) can abort the
    process with SIGABRT after it has done its work (seen in the bench's overlap probe)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
