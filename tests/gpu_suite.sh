#!/usr/bin/env bash
# The GPU suite: every test marked `cuda` (tests/test_cuda.py, and the NCCL failure test of
# tests/test_reliability.py), on the GPUs this machine has.
# Needs CUDA torch and the project installed (pip install -e ".[test]"); takes under 8 minutes on
# one H100/H200. Prints the bf16 benchmark table (TFLOP/s, fraction of peak) with -s.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec timeout 480 python -m pytest -m cuda -s -v -p no:cacheprovider tests/test_cuda.py tests/test_reliability.py "$@"
