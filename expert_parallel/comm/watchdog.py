"""A stalled collective on NCCL, named before the job ends.

On gloo a collective whose peer is gone raises after the job's timeout, and
:func:`~expert_parallel.comm.exchange.guarded` turns that into a ``CollectiveError`` naming the layer,
call and phase. On NCCL collectives are asynchronous: the rank blocks later, at the next host read
(the exchange's split sizes), and torch's NCCL watchdog ends the process at the timeout with a
message about a sequence number, not a layer. So on NCCL jobs a daemon thread watches what the
library is waiting on (:func:`in_flight` marks each collective and host read with its layer, call
and phase) and, when one has not finished after ``fraction`` of the collective timeout, prints it and
ends the process (exit status 1), which the launcher sees as a failed rank and stops the job.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any

import torch
from torch import Tensor

STALL_FRACTION = 0.9
"""The reporter ends a stalled rank at this fraction of the collective timeout (before NCCL's
watchdog, which ends it at the timeout with less to say)."""

# What this process waits on now: (description, since) of each thread's outermost marked region
# (autograd runs a CUDA backward, and its collectives, on a thread of its own).
_WAITING: dict[int, tuple[str, float]] = {}
_REPORTER: list[threading.Thread] = []


class _InFlight:
    """Marks the outermost region: who waits on what, since when."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.outer: tuple[str, float] | None = None

    def __enter__(self) -> None:
        self.thread = threading.get_ident()
        self.outer = _WAITING.get(self.thread)
        if self.outer is None:
            _WAITING[self.thread] = (self.what, time.monotonic())

    def __exit__(self, *exc: object) -> None:
        if self.outer is None:
            _WAITING.pop(self.thread, None)


def in_flight(what: str) -> contextlib.AbstractContextManager[None]:
    """Marks a collective or host read that can block on a peer; nested regions keep the outer.
    Nothing under torch.compile (a plain ``nullcontext`` there, which Dynamo traces without a
    graph break; the exchange's collectives and reads run eagerly between graphs anyway)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _InFlight(what)


def read_on_host(tensor: Tensor, what: str) -> Any:
    """``tensor.tolist()`` inside :func:`in_flight` (``what`` names the read), eagerly also in a
    compiled model: the read breaks the graph anyway, and this way its mark is set there too."""
    return _read_marked(tensor, what)


@torch.compiler.disable
def _read_marked(tensor: Tensor, what: str) -> Any:
    with _InFlight(what):
        return tensor.tolist()


# The reporter's settings: the stall limit and the collective timeout (seconds) and this rank.
_SETTINGS: dict[str, float] = {}


def _watch() -> None:
    while True:
        time.sleep(min(1.0, _SETTINGS["limit"] / 20))
        marks = list(_WAITING.values())  # a copy: the threads change it meanwhile
        if not marks:
            continue
        waiting = min(marks, key=lambda mark: mark[1])  # the longest wait
        elapsed = time.monotonic() - waiting[1]
        if elapsed >= _SETTINGS["limit"]:
            sys.stderr.write(
                f"expert_parallel: rank {int(_SETTINGS['rank'])}: {waiting[0]} has not finished after "
                f"{elapsed:.1f} s (the collective timeout is {_SETTINGS['timeout']:.0f} s): a peer of its "
                f"group has exited or stopped. Ending this rank (exit status 1) so that the launcher "
                f"stops the job.\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)


def start_stall_reporter(timeout_s: float, rank: int, fraction: float = STALL_FRACTION) -> None:
    """Starts the reporter thread (once per process; a later call sets its limit and rank): a
    region marked by :func:`in_flight` that lasts ``fraction · timeout_s`` ends the process with a
    message naming it."""
    _SETTINGS.update(limit=fraction * timeout_s, timeout=timeout_s, rank=rank)
    if _REPORTER and _REPORTER[0].is_alive():
        return
    thread = threading.Thread(target=_watch, name="expert_parallel-stall-reporter", daemon=True)
    thread.start()
    _REPORTER[:] = [thread]


__all__ = ["STALL_FRACTION", "in_flight", "read_on_host", "start_stall_reporter"]
