"""Train a byte-level Mixture-of-Experts language model on CPython's documentation text.

    torchrun --standalone --nproc-per-node 2 examples/train_lm.py --ep-size 2 --steps 300
    python examples/train_lm.py --steps 50 --ffn dense

Writes metrics.jsonl, summary.json and PNG plots to --out (default runs/train_lm). Runs unchanged
under every launcher in launch/. Same as ``expert-parallel train``.
"""

import sys

from expert_parallel.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
