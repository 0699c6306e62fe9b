#!/usr/bin/env bash
# One node, N processes (default 2), expert-parallel over all of them: bash launch/torchrun.sh N [options]
set -euo pipefail
cd "$(dirname "$0")/.."
nproc="${1:-2}"
shift || true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc-per-node "$nproc" examples/moe_demo.py "$@"
