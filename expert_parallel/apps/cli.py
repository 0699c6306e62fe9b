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
import os
import platform
import sys
from typing import NoReturn

import torch

from .. import __version__
from ..comm.distributed import default_backend, launch_env, visible_gpus
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
    cuda = visible_gpus()
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


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors printed by rank 0 only (every rank parses the same line)."""

    def error(self, message: str) -> NoReturn:
        if launch_env().rank == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


# Bad input the programs report as a usage error (one line, exit status 2, no traceback): options
# the config or the job setup refuses (a ValueError raised by the config, init_distributed or the
# programs' own checks), files that are not there. Anything raised deeper keeps its traceback, and
# EXPERT_PARALLEL_TRACEBACK=1 shows it for these too.
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError)
_INPUT_CHECKS = ("expert_parallel/config.py", "expert_parallel/comm/distributed.py", "expert_parallel/apps/")


def _is_bad_input(err: BaseException) -> bool:
    """Whether ``err`` reports bad input: one of BAD_INPUT, raised by the input checks themselves."""
    if not isinstance(err, BAD_INPUT) or os.environ.get("EXPERT_PARALLEL_TRACEBACK") == "1":
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename.replace(os.sep, "/") if tb is not None else ""
    return any(check in where for check in _INPUT_CHECKS)


def _bad_input(command: str, err: Exception) -> int:
    """Prints ``err`` as ``expert-parallel COMMAND: error: ...`` once (rank 0; a missing file also
    once per node, where it may be missing on that node only) and ends the job with status 2: its
    process groups destroyed, a launched process ended without teardown."""
    launch = launch_env()
    missing_file = isinstance(err, OSError)
    if launch.rank == 0 or (missing_file and launch.local_rank == 0):
        message = err.args[0] if missing_file and len(err.args) == 1 else err
        where = f"[rank {launch.rank}] " if launch.rank else ""
        print(f"{where}expert-parallel {command}: error: {message}", file=sys.stderr, flush=True)
    shutdown(exit_code=2)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _Parser(prog="expert-parallel", description=__doc__,
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
    try:
        _run(args)
    except BAD_INPUT as err:
        if not _is_bad_input(err):
            raise
        return _bad_input(args.command, err)
    shutdown()  # a launched worker leaves here, skipping the teardown that can abort it
    return 0


def _run(args: argparse.Namespace) -> None:
    """The chosen command."""
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


if __name__ == "__main__":
    sys.exit(main())
