"""The ``expert-parallel`` command: ``demo`` (the single-process demo run) and ``info``."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__, demo


def info() -> str:
    """Versions and devices, for bug reports."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "\n".join([
        f"expert_parallel {__version__}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"cuda devices {cuda}",
        f"distributed available {torch.distributed.is_available()}",
    ])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="expert-parallel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help="train one MoE block on random data"))
    sub.add_parser("info", help="print versions and devices")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    else:
        demo.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
