"""Fine-tune a Hugging Face MoE model (a tiny Qwen3-MoE or DeepSeek-V3, or --model DIR) expert-parallel.

    torchrun --standalone --nproc-per-node 2 examples/finetune_hf.py --family deepseek_v3 --steps 100
    python examples/finetune_hf.py --steps 20

Writes metrics.jsonl, plots and a save_pretrained directory (OUT/model) that plain transformers
loads. Same as ``expert-parallel finetune-hf``; needs the hf extra (docs/hf.md).
"""

import sys

from expert_parallel.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune-hf", *sys.argv[1:]]))
