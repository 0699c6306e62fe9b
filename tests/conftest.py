"""Hypothesis profiles: CI replays a fixed set of examples (derandomized), so a green CI is
reproducible; local runs and tests/repeat_distributed.sh keep exploring new random examples. And the
cleanup of what DeepSpeed leaves in /dev/shm."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# DeepSpeed's CPU communication op (built for the DeepSpeed launcher tests) leaves one shared-memory
# all-reduce buffer per rank in /dev/shm after every job (about 64 MiB each, never unlinked); left
# there they fill the machine's memory over many runs. The session removes the ones it made.
_SHM = Path("/dev/shm")
_DEEPSPEED_BUFFERS = "deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="session", autouse=True)
def _remove_leaked_deepspeed_buffers() -> Iterator[None]:
    before = set(_SHM.glob(_DEEPSPEED_BUFFERS)) if _SHM.is_dir() else set()
    yield
    if _SHM.is_dir():
        for path in set(_SHM.glob(_DEEPSPEED_BUFFERS)) - before:
            path.unlink(missing_ok=True)
