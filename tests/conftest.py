"""Hypothesis profiles: CI replays a fixed set of examples (derandomized), so a green CI is
reproducible; local runs and tests/repeat_distributed.sh keep exploring new random examples. And the
cleanup of what DeepSpeed leaves in /dev/shm."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# torch.compile's on-disk caches are this session's own (inherited by the launched workers): a
# cache shared across runs can hand a compiled graph built against another version of our custom
# operators to this one.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="ep-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _COMPILE_CACHE
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_COMPILE_CACHE, "triton"))

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# DeepSpeed's CPU communication op (built for the DeepSpeed launcher tests) leaves one shared-memory
# all-reduce buffer per rank in /dev/shm after every job (about 64 MiB each, never unlinked); left
# there they fill the machine's memory over many runs. The session removes the ones it made.
_SHM = Path("/dev/shm")
_DEEPSPEED_BUFFERS = "deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="session", autouse=True)
def _remove_compile_cache() -> Iterator[None]:
    yield
    shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _remove_leaked_deepspeed_buffers() -> Iterator[None]:
    before = set(_SHM.glob(_DEEPSPEED_BUFFERS)) if _SHM.is_dir() else set()
    yield
    if _SHM.is_dir():
        for path in set(_SHM.glob(_DEEPSPEED_BUFFERS)) - before:
            path.unlink(missing_ok=True)
