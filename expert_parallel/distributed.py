"""Process groups: launcher detection, init_distributed and the (dp, ep) device mesh.

World layout: world = dp_size x ep_size, built as a 2-D device mesh with dims ("dp", "ep"). The mesh is
row-major, so consecutive ranks form an expert-parallel group: with ep_size 2 and 4 ranks, the EP
groups are {0, 1} and {2, 3} and the DP groups (ranks holding the same experts) are {0, 2} and {1, 3}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEFAULT_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank / world_size / local_rank: from the launcher (0 / 1 / 0 without one).
        device: this process's device (cuda:local_rank with NCCL, else cpu).
        ep_size / dp_size: expert-parallel and data-parallel sizes; world_size = dp_size * ep_size.
        ep_rank / dp_rank: coordinates in the (dp, ep) mesh.
        ep_group: the ranks that share one copy of the experts (consecutive ranks).
        dp_group: the ranks that hold the same experts.
        launcher: what started the process ("torchrun" or "none").
        backend: the process-group backend ("gloo" or "nccl").
        mesh: the 2-D DeviceMesh with dims ("dp", "ep").
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ep_size: int
    dp_size: int
    ep_rank: int
    dp_rank: int
    ep_group: ProcessGroup
    dp_group: ProcessGroup
    launcher: str
    backend: str
    mesh: DeviceMesh


def detect_launcher(env: dict[str, str] | None = None) -> str:
    """Names what started this process from its environment: "torchrun" or "none"."""
    env = dict(os.environ) if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return "torchrun"
    return "none"


def _default_backend(local_world_size: int) -> str:
    """NCCL when each local rank can have its own CUDA device, else gloo."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size:
        return "nccl"
    return "gloo"


def _as_timedelta(timeout: timedelta | float) -> timedelta:
    return timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))


def _init_default_group(launcher: str, backend: str | None, timeout: timedelta) -> str:
    """Creates the default process group (or adopts an existing one); returns its backend."""
    if dist.is_initialized():
        return str(dist.get_backend())
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    backend = backend or _default_backend(local_world)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if launcher == "none":
        # Single-process debug mode: a world of one, so the same code paths (and collectives) run.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)  # NOTE: rendezvous (env://)
    return backend


def init_distributed(ep_size: int | None = None, backend: str | None = None,
                     timeout: timedelta | float = DEFAULT_TIMEOUT) -> DistContext:
    """Initialises torch.distributed for expert parallelism and returns the :class:`DistContext`.

    Works under torchrun (its environment variables) and with no launcher at all (a single process,
    world size 1). An already initialised default process group is adopted.

    Args:
        ep_size: ranks per expert-parallel group; defaults to the world size. Must divide it.
        backend: "nccl" or "gloo"; default NCCL when every local rank has its own CUDA device.
        timeout: collective timeout (timedelta or seconds); a lost peer becomes an error after it.

    Raises:
        ValueError: ep_size is not a positive divisor of the world size.
    """
    launcher = detect_launcher()
    backend = _init_default_group(launcher, backend, _as_timedelta(timeout))
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = world if ep_size is None else ep_size
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1 or world % ep:
        raise ValueError(f"ep_size={ep_size!r} is invalid: expected a positive divisor of the world "
                         f"size {world}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    # NOTE: collective: device_mesh creates the dp and ep sub-groups on every rank.
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return DistContext(
        rank=rank, world_size=world, local_rank=local_rank, device=device, ep_size=ep,
        dp_size=world // ep, ep_rank=rank % ep, dp_rank=rank // ep, ep_group=mesh.get_group("ep"),
        dp_group=mesh.get_group("dp"), launcher=launcher, backend=backend, mesh=mesh)


def group_size_and_rank(group: ProcessGroup | None) -> tuple[int, int]:
    """(size, rank) of ``group``; (1, 0) for None."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_gather_cat(x: Tensor, group: ProcessGroup) -> Tensor:
    """Concatenation along dim 0 of ``x`` from every rank of ``group`` (ranks may differ in dim 0)."""
    size = dist.get_world_size(group)
    if size == 1:
        return x.detach().clone()
    lengths = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(size)]
    # NOTE: collectives: first the row counts, then the rows.
    dist.all_gather(lengths, torch.tensor([x.shape[0]], device=x.device), group=group)
    parts = [x.new_empty((int(n.item()), *x.shape[1:])) for n in lengths]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts)
