#!/usr/bin/env bash
# Single-process run of the demo (world size 1): the debug mode.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python examples/moe_demo.py "$@"
