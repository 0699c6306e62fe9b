#!/usr/bin/env bash
# Repeats the tests that start real processes, to catch flakiness: bash tests/repeat_distributed.sh [N] [pytest args]
# Default: 10 rounds of every distributed test module; stops at the first failing round.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-10}"
shift || true
files=(tests/test_expert_parallel.py tests/test_launchers.py tests/test_checkpoint.py
       tests/test_reliability.py tests/test_train_lm.py tests/test_properties.py)
[[ $# -gt 0 ]] && files=("$@")
passed=0
for round in $(seq 1 "$rounds"); do
  start=$(date +%s)
  if python -m pytest -q -p no:cacheprovider "${files[@]}" > "/tmp/repeat_distributed_$round.log" 2>&1; then
    passed=$((passed + 1))
    echo "round $round: $(tail -1 "/tmp/repeat_distributed_$round.log") ($(( $(date +%s) - start )) s)"
  else
    echo "round $round FAILED, log: /tmp/repeat_distributed_$round.log"; tail -30 "/tmp/repeat_distributed_$round.log"
    echo "$passed passed, 1 failed"; exit 1
  fi
done
echo "$passed passed, 0 failed"
