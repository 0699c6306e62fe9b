#!/usr/bin/env bash
# Single-process run (world size 1), the debug mode, of a program (default: examples/moe_demo.py).
#   bash launch/python.sh [PROGRAM.py | -m MODULE] [program options]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/program.sh
exec python "${PROGRAM[@]}" ${ARGS[@]+"${ARGS[@]}"}
