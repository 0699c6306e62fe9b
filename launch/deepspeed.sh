#!/usr/bin/env bash
# The DeepSpeed launcher running a program. By default the example, examples/moe_demo.py, with
# DeepSpeed's engine (ZeRO 2, launch/ds_config.json); another program runs under the launcher as given.
#   one node:    bash launch/deepspeed.sh --num_gpus 2 [-- [PROGRAM.py] [program options]]
#   many nodes:  bash launch/deepspeed.sh --hostfile launch/hostfile.example [-- [PROGRAM.py] [options]]
# On machines without GPUs set DS_ACCELERATOR=cpu (done here when no GPU is visible).
set -euo pipefail
cd "$(dirname "$0")/.."
launcher_args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do launcher_args+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
[[ "${1:-}" != -m ]] || { echo "launch/deepspeed.sh: give the program as a .py file, not -m" >&2; exit 2; }
source launch/program.sh
[[ "${PROGRAM[0]}" != examples/moe_demo.py ]] || ARGS=(--deepspeed launch/ds_config.json ${ARGS[@]+"${ARGS[@]}"})
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# A free port: the launcher's default (29500) collides between concurrent jobs on one host.
port="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}"
exec deepspeed --master_port "$port" "${launcher_args[@]:---num_gpus=2}" "${PROGRAM[@]}" \
  ${ARGS[@]+"${ARGS[@]}"}
