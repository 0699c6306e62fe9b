# Sourced by the launch scripts: the program to run is the first argument when it is a Python file
# (examples/train_lm.py) or "-m MODULE"; otherwise the example, examples/moe_demo.py, and every
# argument is the program's. Sets PROGRAM (an array) and ARGS (the rest).
PROGRAM=(examples/moe_demo.py)
if [[ "${1:-}" == *.py ]]; then
  PROGRAM=("$1"); shift
elif [[ "${1:-}" == -m ]]; then
  [[ -n "${2:-}" ]] || { echo "launch: -m needs a module name" >&2; exit 2; }
  PROGRAM=(-m "$2"); shift 2
fi
if [[ "${PROGRAM[0]}" == *.py && ! -f "${PROGRAM[0]}" ]]; then
  echo "launch: no such program: ${PROGRAM[0]}" >&2
  exit 2
fi
ARGS=("$@")
