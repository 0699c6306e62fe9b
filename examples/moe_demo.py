"""Single-process demo: one MoE block trained a few steps on random data, with routing statistics.

    python examples/moe_demo.py --num-experts 8 --top-k 2 --capacity-factor 1.25
    python examples/moe_demo.py --capacity-factor none      # dropless

Same as ``expert-parallel demo``.
"""

import sys

from expert_parallel.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
