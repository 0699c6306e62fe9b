"""The end of a job: process groups destroyed, output flushed, and a launched process ended cleanly."""

from __future__ import annotations

import atexit
import os
import sys
import time

import torch.distributed as dist

from . import exchange
from .distributed import DistContext, launch_env

MPI_LINGER_S = 0.1  # seconds between MPI_Finalize and the exit (see shutdown)


def shutdown(ctx: DistContext | None = None, *, exit_process: bool | None = None, exit_code: int = 0) -> None:
    """Ends the job's process groups; in a launched process, also the process. Call it last.

    Process groups outlive ``destroy_process_group`` while anything still references them (the
    model's layers, a DeepSpeed engine), and gloo's worker threads destroyed during interpreter
    teardown sometimes abort a process that has finished its work with SIGABRT ("terminate called
    without an active exception"), which the launcher then reports as a failed job. Measured here
    on a plain torch script that ends with ``destroy_process_group()``: 1 run in 8 (2 in 5 for a
    Hugging Face model). So, in order:

    1. every process group is destroyed (a collective-free call; each rank may reach it at its own
       time); a process that goes on (``exit_process=False``) also drops the library's cached
       sub-groups, so that a new ``init_distributed`` builds fresh ones;
    2. under a launcher (torchrun, DeepSpeed, mpirun, srun) the process then runs its ``atexit``
       handlers (logging, experiment trackers; not under mpirun, see below), flushes stdout and
       stderr, under mpirun finalizes MPI (MPICH's mpiexec ends the whole job once a rank leaves
       without it, killing the ranks still at work) and waits ``MPI_LINGER_S`` for mpiexec to take
       the finalize, and leaves with ``os._exit(exit_code)``,
       skipping the interpreter teardown where the abort happens. Files you opened yourself must
       be closed before (a ``with`` block does that).

    Without a launcher (one ``python`` process, a notebook, a test) it only destroys the groups and
    returns.

    Args:
        ctx: the job's context (its ``launcher`` decides whether to exit); default: read from the
            environment.
        exit_process: force (True) or prevent (False) the exit; default: exit when launched.
        exit_code: the launched process's exit status (0; the programs use 2 for bad input).
    """
    launcher = ctx.launcher if ctx is not None else launch_env().launcher
    started = dist.is_available() and dist.is_initialized()
    if exit_process is None:
        exit_process = started and launcher != "none"
    if not exit_process:
        # Only here: released, the cached groups would run their destructors (gloo's threads) just
        # before the exit, which got one of four ranks killed by mpiexec in about 1 of 10 loaded
        # runs of the demo (0 of 40 with the references kept until os._exit).
        exchange.forget_groups()
    if started:
        dist.destroy_process_group()
    if exit_process:
        # atexit handlers run now, while the interpreter is whole; os._exit skips them otherwise.
        # Not under mpirun: there, running them got one of four ranks killed with SIGKILL by mpiexec
        # in 3 of 22 runs of the demo on a busy machine (0 of 20 without).
        if launcher != "mpi":
            atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        if launcher == "mpi":
            _finalize_mpi()
            # MPICH's process manager (hydra, 5.0.2) kills every rank with SIGKILL when a rank's
            # connection to it closes before it has taken that rank's finalize: leaving at once lost
            # a rank in 3 of 110 runs of `launch/mpirun.sh 4`, 0 of 80 with this pause.
            time.sleep(MPI_LINGER_S)
        os._exit(exit_code)


def _finalize_mpi() -> None:
    """MPI_Finalize, where mpi4py initialised MPI (the rendezvous did): MPICH's mpiexec ends the
    whole job, silently, once a rank leaves without it, so the first rank to shut down got the
    ranks still finishing their work killed."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
