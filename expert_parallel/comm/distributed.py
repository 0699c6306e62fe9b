"""Process groups: launcher detection, init_distributed and the (dp, ep) device mesh.

World layout: world = dp_size x ep_size, built as a 2-D device mesh with dims ("dp", "ep"). The mesh is
row-major, so consecutive ranks form an expert-parallel group: with ep_size 2 and 4 ranks, the EP
groups are {0, 1} and {2, 3} and the DP groups (ranks holding the same experts) are {0, 2} and {1, 3}.
"""

from __future__ import annotations

import contextlib
import os
import socket
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .watchdog import start_stall_reporter

DEFAULT_TIMEOUT = timedelta(minutes=5)
# The collective timeout of the job (init_distributed's), for the groups made later (sub-groups of
# the hierarchical exchange); the default for a process group adopted from elsewhere.
_JOB_TIMEOUT = [DEFAULT_TIMEOUT]


def job_timeout() -> timedelta:
    """The collective timeout given to init_distributed (5 minutes by default)."""
    return _JOB_TIMEOUT[0]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank / world_size / local_rank: from the launcher (0 / 1 / 0 without one).
        device: this process's device (cuda:(local_rank % visible GPUs) with NCCL, else cpu).
        ep_size / dp_size: expert-parallel and data-parallel sizes; world_size = dp_size * ep_size.
        ep_rank / dp_rank: coordinates in the (dp, ep) mesh.
        ep_group: the ranks that share one copy of the experts (consecutive ranks).
        dp_group: the ranks that hold the same experts.
        launcher: what started the process: "torchrun", "deepspeed", "mpi", "slurm" or "none".
        backend: the backend of the data collectives, "gloo" or "nccl" (an NCCL job's groups also
            carry gloo for CPU tensors: "cpu:gloo,cuda:nccl").
        mesh: the 2-D DeviceMesh with dims ("dp", "ep"), over the groups above.
        world_group: a group of the library's own over every rank of the job, for the job-wide
            collectives of the library (gradient sums, norms, checkpoints, saves).

    Every group here is the library's own, also where it spans the whole job: a collective the user
    runs on the default group (or on any group of theirs) can never pair with one of the library's,
    whatever order the ranks run them in.
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
    world_group: ProcessGroup


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: its coordinates and where rank 0 listens.

    master_addr / master_port are None where the launcher leaves the rendezvous to torch (torchrun,
    DeepSpeed: MASTER_ADDR / MASTER_PORT are already in the environment) or to MPI (chosen on rank 0).
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None


_MPI_VARS = (  # (rank, size, local rank, local size) as Open MPI, MPICH/Hydra and PMIx name them
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)


def detect_launcher(env: dict[str, str] | None = None) -> str:
    """Names what started this process: "torchrun", "deepspeed", "mpi", "slurm" or "none".

    Checked in this order: torch elastic (TORCHELASTIC_RUN_ID, or RANK and WORLD_SIZE without the
    DeepSpeed launcher's CROSS_RANK), the DeepSpeed launcher (RANK with CROSS_RANK / LOCAL_SIZE), MPI
    (OMPI_*, PMI_* or PMIX_* rank variables), SLURM's srun (SLURM_PROCID with a job step), none.
    """
    env = dict(os.environ) if env is None else env
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "deepspeed" if "CROSS_RANK" in env or "LOCAL_SIZE" in env else "torchrun"
    if any(names[0] in env for names in _MPI_VARS):
        return "mpi"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and (
            "SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return "slurm"
    return "none"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "node[003-005,9],gpu1" -> "node003"."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # first top-level comma ends the first entry
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    if "[" not in entry:
        return entry
    prefix, rest = entry.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _int(env: dict[str, str], name: str, default: int) -> int:
    return int(env[name]) if name in env else default


# What init_distributed published into os.environ for an mpirun/srun process (RANK, WORLD_SIZE, ...),
# with the launch it read before: those variables alone would read as torchrun afterwards.
_PUBLISHED: list[tuple[LaunchEnv, dict[str, str]]] = []


def launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """Reads this process's coordinates from the environment of the launcher that started it.

    Under mpirun / srun, after :func:`init_distributed` published RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT (torch's env:// names), this still says "mpi" / "slurm" with their local sizes, for
    as long as those variables keep the published values.
    """
    if env is None and _PUBLISHED and all(os.environ.get(k) == v for k, v in _PUBLISHED[0][1].items()):
        return _PUBLISHED[0][0]
    env = dict(os.environ) if env is None else env
    launcher = detect_launcher(env)
    if launcher in ("torchrun", "deepspeed"):
        local = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", _int(env, "WORLD_SIZE", 1)))
        return LaunchEnv(launcher, int(env["RANK"]), int(env["WORLD_SIZE"]),
                         _int(env, "LOCAL_RANK", 0), local)
    if launcher == "mpi":
        rank_v, size_v, local_v, local_size_v = next(v for v in _MPI_VARS if v[0] in env)
        return LaunchEnv("mpi", int(env[rank_v]), int(env[size_v]), _int(env, local_v, 0),
                         _int(env, local_size_v, 1), env.get("MASTER_ADDR"),
                         int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None)
    if launcher == "slurm":
        world = int(env["SLURM_NTASKS"])
        nodes = _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", 1))
        # A port every task derives alike from the job id, unless MASTER_PORT says otherwise.
        port = _int(env, "MASTER_PORT", 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000)
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_STEP_NODELIST")
                                                            or env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return LaunchEnv("slurm", int(env["SLURM_PROCID"]), world, _int(env, "SLURM_LOCALID", 0),
                         _int(env, "SLURM_NTASKS_PER_NODE", max(world // max(nodes, 1), 1)), addr, port)
    return LaunchEnv("none", 0, 1, 0, 1)


def _mpi_rendezvous(launch: LaunchEnv) -> tuple[str, int]:
    """MASTER_ADDR and a free port chosen on rank 0 and broadcast over MPI (mpi4py)."""
    if launch.master_addr is not None and launch.master_port is not None:
        return launch.master_addr, launch.master_port
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError("started by mpirun/mpiexec but mpi4py is not installed: install mpi4py, "
                           "or set MASTER_ADDR and MASTER_PORT for every rank") from err
    address = None
    if launch.rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))  # a free port, so concurrent jobs on one host do not collide
            address = (launch.master_addr or socket.gethostname(),
                       sock.getsockname()[1])
    host, port = MPI.COMM_WORLD.bcast(address, root=0)  # NOTE: collective (MPI broadcast)
    return host, int(port)


def visible_gpus() -> int:
    """The CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


_DEVICE_LISTS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")


def _given_one_gpu(env: dict[str, str]) -> bool:
    """Whether the launcher gave this task one GPU of its own: a visible-device list of one entry
    (SLURM's ``--gpus-per-task=1`` sets CUDA_VISIBLE_DEVICES per task, Kubernetes' device plugin
    NVIDIA_VISIBLE_DEVICES per container)."""
    for name in _DEVICE_LISTS:
        value = env.get(name, "").strip()
        if value and value.lower() not in ("all", "none", "void") and "," not in value:
            return True
    return False


def default_backend(launch: LaunchEnv, cuda_devices: int | None = None,
                    env: dict[str, str] | None = None) -> str:
    """The backend a job gets when it asks for none.

    Without a launcher (``python script.py``, the single-process debug mode): gloo, whatever GPUs
    the machine has. With a launcher: NCCL when every local rank can have a GPU of its own: the rank
    sees at least as many GPUs as its node runs ranks, or its launcher gave it exactly one (a
    one-entry CUDA_VISIBLE_DEVICES or NVIDIA_VISIBLE_DEVICES: one GPU per task); else gloo (e.g.
    ``torchrun --nproc-per-node 2`` on a machine with one GPU, where NCCL would refuse two ranks on
    one device). ``cuda_devices`` defaults to the devices torch sees, ``env`` to the environment.
    """
    cuda_devices = visible_gpus() if cuda_devices is None else cuda_devices
    env = dict(os.environ) if env is None else env
    if launch.launcher == "none" or cuda_devices < 1:
        return "gloo"
    own = cuda_devices >= launch.local_world_size or (cuda_devices == 1 and _given_one_gpu(env))
    return "nccl" if own else "gloo"


def local_gpu(launch: LaunchEnv, cuda_devices: int | None = None) -> int:
    """The CUDA device index this rank takes: ``local_rank % visible devices``.

    Every rank sees every GPU of its node (torchrun's usual setup): rank i takes GPU i. Each rank
    sees only its own (SLURM ``--gpus-per-task=1``, Kubernetes device plugins: ``device_count()`` is
    1 while the node runs several ranks): every rank takes its GPU 0.

    Raises:
        ValueError: this rank sees no CUDA device.
    """
    cuda_devices = visible_gpus() if cuda_devices is None else cuda_devices
    if cuda_devices < 1:
        raise ValueError("backend='nccl' needs a CUDA device, and this rank sees none "
                         "(torch.cuda.device_count() is 0; check CUDA_VISIBLE_DEVICES): use backend='gloo'")
    return launch.local_rank % cuda_devices


def check_one_gpu_per_rank(device: torch.device) -> None:
    """Raises ValueError on every rank when two ranks of the job hold the same GPU (NCCL would
    refuse them later, with "Duplicate GPU detected" at the first collective). A collective: an
    all-gather of a CPU tensor (the gloo side of the job's group)."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", device.index)
    mine = torch.tensor([zlib.crc32(f"{socket.gethostname()}/{uuid}".encode())], dtype=torch.int64)
    table = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(table, mine)  # NOTE: collective (gloo)
    holders: dict[int, list[int]] = {}
    for rank, ident in enumerate(table):
        holders.setdefault(int(ident), []).append(rank)
    shared = [ranks for ranks in holders.values() if len(ranks) > 1]
    if shared:
        raise ValueError(f"backend='nccl' with ranks {shared[0]} on one GPU ({device} of the same host): "
                         f"NCCL needs a GPU per rank. Give each rank its own GPU (as many visible GPUs "
                         f"as ranks per node, or one per task), run fewer ranks per node, or pass "
                         f"backend='gloo' (--backend gloo in the programs)")


def process_group_backend(backend: str) -> str:
    """What the default process group is created with: NCCL for CUDA tensors plus gloo for CPU ones.

    Host-side tensors (debug flags, split-size checks, metrics built on the host) then still reach
    every rank under NCCL instead of failing with a device error.
    """
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def _as_timedelta(timeout: timedelta | float) -> timedelta:
    return timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))


def _init_default_group(launch: LaunchEnv, backend: str | None, timeout: timedelta) -> str:
    """Creates the default process group (or adopts an existing one); returns its backend."""
    if dist.is_initialized():
        adopted = "nccl" if "nccl" in str(dist.get_backend()) else str(dist.get_backend())
        if adopted == "nccl":
            torch.cuda.set_device(local_gpu(launch))  # object collectives use the current device
        return adopted
    backend = backend or default_backend(launch)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r} is invalid: expected 'gloo', 'nccl' or None (default)")
    if backend == "nccl":
        torch.cuda.set_device(local_gpu(launch))
    pg_backend = process_group_backend(backend)
    if launch.launcher == "none":
        # Single-process debug mode: a world of one, so the same code paths (and collectives) run.
        dist.init_process_group(pg_backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        return backend
    if launch.launcher in ("mpi", "slurm"):
        addr, port = (_mpi_rendezvous(launch) if launch.launcher == "mpi"
                      else (launch.master_addr, launch.master_port))
        # Published for code that reads the usual variables (and for env:// below); launch_env
        # keeps naming the launcher that started the process (shutdown and the node layout need it).
        published = dict(MASTER_ADDR=str(addr), MASTER_PORT=str(port), RANK=str(launch.rank),
                         WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank))
        os.environ.update(published)
        _PUBLISHED[:] = [(replace(launch, master_addr=str(addr), master_port=int(published["MASTER_PORT"])),
                          published)]
    if launch.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(pg_backend, store=_elastic_store(launch, timeout), rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout)
        return backend
    # DeepSpeed, MPI, SLURM (and torchrun without an agent store): env:// rendezvous.
    dist.init_process_group(pg_backend, init_method="env://", rank=launch.rank,  # NOTE: rendezvous
                            world_size=launch.world_size, timeout=timeout)
    return backend


def _elastic_store(launch: LaunchEnv, timeout: timedelta) -> dist.Store:
    """torchrun's agent store, as a client, under a prefix per restart attempt.

    Reusing the launcher's store (not building a second one, which can hang at start-up) while giving
    every restart attempt its own key space: a restarted gloo job that reads the previous attempt's
    keys may try to connect to dead workers.
    """
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           launch.world_size, is_master=False, timeout=timeout)  # NOTE: rendezvous
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"expert_parallel/attempt_{attempt}", client)


def init_distributed(ep_size: int | None = None, backend: str | None = None,
                     timeout: timedelta | float | None = None) -> DistContext:
    """Initialises torch.distributed for expert parallelism and returns the :class:`DistContext`.

    Works under torchrun (one or several nodes), the DeepSpeed launcher, mpirun / mpiexec (ranks from
    the MPI environment, rendezvous on rank 0's host with a free port broadcast over mpi4py), SLURM's
    srun, and with no launcher at all (a single process, world size 1). An already initialised default
    process group (e.g. from ``deepspeed.init_distributed``) is adopted, not re-created.

    Args:
        ep_size: ranks per expert-parallel group; defaults to the world size. Must divide it.
        backend: "nccl" or "gloo". Default: gloo without a launcher (one process); under a
            launcher NCCL when every local rank can have a GPU of its own (:func:`default_backend`),
            else gloo. With NCCL the rank takes GPU ``local_rank % torch.cuda.device_count()`` (its
            only one where each task sees one), and two ranks on one GPU are a ValueError at once.
            NCCL groups are created as "cpu:gloo,cuda:nccl", so CPU tensors still work in their
            collectives.
        timeout: collective timeout (timedelta or seconds; default 5 minutes); a lost peer becomes
            an error after it. An adopted group keeps its own; the library's sub-groups and, on
            NCCL, the stall reporter use the one given here (started only when one is given).

    Raises:
        ValueError: ep_size is not a positive divisor of the world size; two ranks on one GPU.
    """
    launch = launch_env()
    adopting = dist.is_initialized()
    _JOB_TIMEOUT[0] = _as_timedelta(DEFAULT_TIMEOUT if timeout is None else timeout)
    backend = _init_default_group(launch, backend, _JOB_TIMEOUT[0])
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = world if ep_size is None else ep_size
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1 or world % ep:
        raise ValueError(f"ep_size={ep_size!r} is invalid: expected a positive divisor of the world "
                         f"size {world}")
    local_rank = launch.local_rank
    device = torch.device("cuda", local_gpu(launch)) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl" and world > 1:
        check_one_gpu_per_rank(device)
    if backend == "nccl" and not (adopting and timeout is None):
        # names the layer of a collective whose peer is gone (docs/reliability.md); an adopted
        # group's own timeout is not known here, so the reporter waits for one to be given
        start_stall_reporter(_JOB_TIMEOUT[0].total_seconds(), rank)
    groups = own_groups(world, ep, rank)
    mesh = DeviceMesh.from_group([groups.dp, groups.ep], device.type,
                                 mesh=torch.arange(world).view(world // ep, ep), mesh_dim_names=("dp", "ep"))
    _JOB_GROUP[:] = [(dist.group.WORLD, groups.world)]
    return DistContext(
        rank=rank, world_size=world, local_rank=local_rank, device=device, ep_size=ep,
        dp_size=world // ep, ep_rank=rank % ep, dp_rank=rank // ep, ep_group=groups.ep,
        dp_group=groups.dp, launcher=launch.launcher, backend=backend, mesh=mesh, world_group=groups.world)


@dataclass(frozen=True)
class OwnGroups:
    """This rank's expert-parallel and data-parallel groups and the job-wide group, all new."""

    ep: ProcessGroup
    dp: ProcessGroup
    world: ProcessGroup


def own_groups(world: int, ep: int, rank: int) -> OwnGroups:
    """Creates the (dp, ep) layout's groups and a job-wide group, as new process groups.

    ``init_device_mesh`` hands back the default group for a mesh dimension that spans the job (the
    expert-parallel group when ep_size is the world size), where a user's own collective could pair
    with one of the library's once the ranks' call sequences differ; new groups never do. Every rank
    creates every group, in the same order (``new_group``'s contract).
    NOTE: collectives (one store rendezvous per group, at start-up only).
    """
    ep_groups = [_new_group(list(range(d * ep, (d + 1) * ep))) for d in range(world // ep)]
    dp_groups = [_new_group(list(range(j, world, ep))) for j in range(ep)]
    job = _new_group(list(range(world)))
    return OwnGroups(ep=ep_groups[rank // ep], dp=dp_groups[rank % ep], world=job)


def _new_group(ranks: list[int]) -> ProcessGroup:
    made = dist.new_group(ranks, timeout=job_timeout())  # NOTE: collective (group creation)
    assert made is not None  # every rank creates every group, so each gets a handle (or a non-member)
    return made


# The job-wide group of init_distributed, with the default group it was made under (a group of an
# earlier, destroyed default group is never handed out).
_JOB_GROUP: list[tuple[ProcessGroup | None, ProcessGroup]] = []


def job_group() -> ProcessGroup | None:
    """The library's job-wide group: init_distributed's ``ctx.world_group``; the default group
    where init_distributed did not run (a job that made its own groups); None without a process
    group."""
    if not dist.is_initialized():
        return None
    if _JOB_GROUP and _JOB_GROUP[0][0] is dist.group.WORLD:
        return _JOB_GROUP[0][1]
    return dist.group.WORLD


def group_size_and_rank(group: ProcessGroup | None) -> tuple[int, int]:
    """(size, rank) of ``group``; (1, 0) for None."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def group_ranks_per_node(group: ProcessGroup, local_world_size: int | None = None) -> int | None:
    """P: the ranks of ``group`` on each node, or None where the group spans nodes unevenly.

    Nodes hold contiguous blocks of ``local_world_size`` global ranks (the launcher's
    LOCAL_WORLD_SIZE or its equivalent by default; without a launcher, one node).
    """
    if local_world_size is None:
        launch = launch_env()
        local_world_size = launch.local_world_size if launch.launcher != "none" else dist.get_world_size()
    if local_world_size < 1:
        raise ValueError(f"ranks per node must be >= 1, got {local_world_size}")
    ranks = dist.get_process_group_ranks(group)
    nodes = [r // local_world_size for r in ranks]
    per_node = [nodes.count(v) for v in dict.fromkeys(nodes)]
    contiguous = all(nodes[i] <= nodes[i + 1] for i in range(len(nodes) - 1))
    if not contiguous or len(set(per_node)) != 1:
        return None
    return per_node[0]


def check_node_layout(group: ProcessGroup, per_node: int, from_launcher: bool = True) -> None:
    """Raises ValueError unless every rank of ``group`` uses the same ranks per node and, for a
    ``per_node`` taken from the launcher where torchrun names each rank's node (GROUP_RANK), the
    nodes it implies are the real ones (ranks of one node, and only they, share a GROUP_RANK).
    NOTE: collective (one all_gather_object over ``group``)."""
    layouts: list[Any] = [None] * dist.get_world_size(group)
    node = os.environ.get("GROUP_RANK") if from_launcher else None
    dist.all_gather_object(layouts, (per_node, node), group=group)
    if len({p for p, _ in layouts}) > 1:
        raise ValueError(f"the ranks of the expert-parallel group disagree on ranks per node "
                         f"{[p for p, _ in layouts]} (LOCAL_WORLD_SIZE or ranks_per_node differ)")
    named = [g for _, g in layouts]
    if None in named:
        return
    pairs = {(i // per_node, g) for i, g in enumerate(named)}
    if len(pairs) != len({v for v, _ in pairs}) or len(pairs) != len({g for _, g in pairs}):
        raise ValueError(f"{per_node} ranks per node put ranks of different nodes together (torchrun's "
                         f"GROUP_RANK per rank: {named}): ranks must be contiguous per node")


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor's whole value on every rank (a collective over its mesh); any other tensor as is.
    Detached."""
    return t.full_tensor().detach() if isinstance(t, DTensor) else t.detach()


def copy_into_shard(shard: DTensor, whole: Tensor) -> None:
    """Writes this rank's part of ``whole`` (the value of the DTensor on one mesh dimension, e.g.
    FSDP2's ``Shard(d)``) into the DTensor's local shard; no communication."""
    (placement,) = shard.placements
    if not isinstance(placement, Shard):
        raise ValueError(f"copy_into_shard: placement {placement} is not a Shard")
    chunks = torch.chunk(whole, shard.device_mesh.size(), dim=placement.dim)  # FSDP2's and DTensor's split
    k = shard.device_mesh.get_local_rank()
    shard.to_local().copy_(chunks[k] if k < len(chunks) else whole.narrow(placement.dim, 0, 0))


@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Within: the module's DTensor parameters (``ep.fully_shard``'s shards) as whole tensors on the
    rank's device; after: each rank keeps its shard of what was written to them (no communication:
    every rank writes the same values)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter, Tensor]] = []
    for owner in module.modules():
        for name, p in list(owner._parameters.items()):
            if isinstance(p, DTensor):
                whole = torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)
                owner._parameters[name] = nn.Parameter(whole, requires_grad=p.requires_grad)
                swapped.append((owner, name, p, whole))
    try:
        yield
    finally:
        for owner, name, p, whole in swapped:
            owner._parameters[name] = p
            assert isinstance(p, DTensor)
            with torch.no_grad():
                copy_into_shard(p, whole)


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


def gather_rows_to(x: Tensor, group: dist.ProcessGroup | None, dst: int) -> Tensor | None:
    """``x``'s rows from every rank of ``group`` concatenated in group order, on global rank ``dst``
    only (None elsewhere). Every rank holds the same number of rows (E divides by the group size).
    A collective over ``group``; ``dst`` must be in it."""
    if group is None or dist.get_world_size(group) == 1:
        return x.detach()
    x = x.detach().contiguous()
    if dist.get_rank() != dst:
        dist.send(x, dst=dst, group=group)  # NOTE: point-to-point
        if x.is_cuda:  # NCCL's send returns at once: one tensor in flight, not the whole model's
            torch.cuda.current_stream(x.device).synchronize()
        return None
    # Received straight into the rows of the result: gloo's gather would receive into a flat buffer
    # of its own and copy, a second copy of the block on the writing rank.
    ranks = dist.get_process_group_ranks(group)
    whole = x.new_empty((x.shape[0] * len(ranks), *x.shape[1:]))
    parts = whole.chunk(len(ranks))
    waits = [dist.irecv(part, src=src, group=group) for src, part in zip(ranks, parts, strict=True)
             if src != dst]  # NOTE: point-to-point
    parts[ranks.index(dst)].copy_(x)
    for work in waits:
        if work is not None:
            work.wait()
    return whole


def in_group(group: dist.ProcessGroup | None, rank: int) -> bool:
    """Whether global rank ``rank`` is in ``group`` (None: the whole job)."""
    return group is None or rank in dist.get_process_group_ranks(group)


def receives(to_rank: int | None) -> bool:
    """Whether this process gets what is gathered ``to_rank`` (None: every rank; else that global
    rank; rank 0 without a process group)."""
    return to_rank is None or (dist.get_rank() if dist.is_initialized() else 0) == to_rank


def check_same_on_all_ranks(sections: dict[str, dict[str, Any]], group: ProcessGroup,
                            hints: dict[str, str] | None = None) -> None:
    """Raises ValueError naming the fields that differ between the ranks of ``group``.

    ``sections`` maps a name ("MoEConfig", ...) to this rank's values; all sections travel in one
    ``all_gather_object``, a cheap collective at construction instead of a hang or silently
    different replicas later. The first section with a difference is reported, with its hint.
    """
    size = dist.get_world_size(group)
    if size == 1:
        return
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, sections, group=group)  # NOTE: collective
    ranks = dist.get_process_group_ranks(group)
    for what, values in sections.items():
        theirs = [other[what] for other in everyone]
        fields = sorted(k for k in values if any(other.get(k) != values[k] for other in theirs))
        if fields:
            per_rank = "; ".join(f"rank {ranks[q]}: " + ", ".join(f"{k}={theirs[q].get(k)!r}" for k in fields)
                                 for q in range(size))
            hint = (hints or {}).get(what, "")
            raise ValueError(f"{what} differs between the ranks of the expert-parallel group in {fields} "
                             f"({per_rank}){hint}")


def fingerprint(t: Tensor) -> int:
    """An integer that changes whenever any bit of ``t`` does (a weighted sum of its bytes).

    For comparing replicas across ranks without sending them; torch only (the library needs no numpy).
    """
    data = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).long()
    index = torch.arange(1, data.numel() + 1, dtype=torch.int64, device=data.device)
    weights = index * 2654435761 % (2**31 - 1)
    return int((data * weights).sum())
