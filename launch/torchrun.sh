#!/usr/bin/env bash
# torchrun running the example, expert-parallel over all ranks.
#   one node:    bash launch/torchrun.sh 4 [demo options]
#   many nodes:  on every node, with the same RDZV_ENDPOINT (host:port of one of them):
#                NNODES=2 RDZV_ENDPOINT=node001:29400 bash launch/torchrun.sh 8 [demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
nproc="${1:-2}"
shift || true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ -n "${NNODES:-}" && "${NNODES}" != "1" ]]; then
  exec torchrun --nnodes "$NNODES" --nproc-per-node "$nproc" --rdzv-backend c10d \
    --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" --rdzv-id "${RDZV_ID:-moe_demo}" \
    examples/moe_demo.py "$@"
fi
exec torchrun --standalone --nproc-per-node "$nproc" examples/moe_demo.py "$@"
