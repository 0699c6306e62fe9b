#!/usr/bin/env bash
# The DeepSpeed launcher running the example with DeepSpeed's engine (ZeRO 2, launch/ds_config.json).
#   one node:    bash launch/deepspeed.sh --num_gpus 2 [-- demo options]
#   many nodes:  bash launch/deepspeed.sh --hostfile launch/hostfile.example [-- demo options]
# On machines without GPUs set DS_ACCELERATOR=cpu (done here when no GPU is visible).
set -euo pipefail
cd "$(dirname "$0")/.."
launcher_args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do launcher_args+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# A free port: the launcher's default (29500) collides between concurrent jobs on one host.
port="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}"
exec deepspeed --master_port "$port" "${launcher_args[@]:---num_gpus=2}" examples/moe_demo.py \
  --deepspeed launch/ds_config.json "$@"
