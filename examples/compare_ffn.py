"""Dense vs MoE (top-1, top-2, expert choice) language models at equal active parameters per token.

    torchrun --standalone --nproc-per-node 2 examples/compare_ffn.py --ep-size 2 --steps 400

Same as ``expert-parallel compare``; writes runs/compare/results.md and val_loss.png.
"""

import sys

from expert_parallel.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
