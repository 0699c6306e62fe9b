#!/usr/bin/env bash
# mpirun / mpiexec (MPICH or Open MPI) running a program (default: the example, examples/moe_demo.py):
# rank 0 picks a free port and broadcasts it over MPI (mpi4py).
#   one node:    bash launch/mpirun.sh 4 [PROGRAM.py | -m MODULE] [program options]
#   many nodes:  MPI_HOSTS=node001,node002 bash launch/mpirun.sh 16 [PROGRAM.py] [program options]
set -euo pipefail
cd "$(dirname "$0")/.."
nproc="${1:-2}"
shift || true
source launch/program.sh
hosts=()
[[ -n "${MPI_HOSTS:-}" ]] && hosts=(-hosts "$MPI_HOSTS")
exec mpiexec -n "$nproc" ${hosts[@]+"${hosts[@]}"} -env OMP_NUM_THREADS 1 python "${PROGRAM[@]}" \
  ${ARGS[@]+"${ARGS[@]}"}
