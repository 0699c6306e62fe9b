#!/usr/bin/env bash
# torchrun running a program (default: the example, examples/moe_demo.py), expert-parallel over all ranks.
#   one node:    bash launch/torchrun.sh 4 [PROGRAM.py | -m MODULE] [program options]
#   many nodes:  on every node, with the same RDZV_ENDPOINT (host:port of one of them):
#                NNODES=2 RDZV_ENDPOINT=node001:29400 bash launch/torchrun.sh 8 [PROGRAM.py] [options]
set -euo pipefail
cd "$(dirname "$0")/.."
nproc="${1:-2}"
shift || true
source launch/program.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [[ -n "${NNODES:-}" && "${NNODES}" != "1" ]]; then
  exec torchrun --nnodes "$NNODES" --nproc-per-node "$nproc" --rdzv-backend c10d \
    --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" --rdzv-id "${RDZV_ID:-moe_demo}" \
    "${PROGRAM[@]}" ${ARGS[@]+"${ARGS[@]}"}
fi
exec torchrun --standalone --nproc-per-node "$nproc" "${PROGRAM[@]}" ${ARGS[@]+"${ARGS[@]}"}
