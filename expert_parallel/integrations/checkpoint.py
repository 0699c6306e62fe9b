"""Checkpoints that survive layout changes and crashes (torch.distributed.checkpoint).

Format: a directory per step written by ``torch.distributed.checkpoint`` (DCP) with
- ``model``: every parameter under its name. Expert tensors are DTensors on the (dp, ep) mesh with
  placements (Replicate, Shard(0)): DCP stores them as the single-device [E, ...] tensor, whatever the
  layout that wrote them, and reshards them into whatever layout loads them;
- ``optim``: optimizer state keyed by parameter name. An expert parameter's moments (any state tensor
  shaped like the parameter) are sharded the same way, so they follow their experts;
- ``meta``: the step and whatever the caller adds (data position, metrics state).
Per-rank RNG states (the CPU generator and every CUDA device's) go beside it
(``rng_rank{r}_of{W}.pt``) and are restored when the world size matches (exact resume); a run
resumed in another layout reseeds instead.

Atomicity: a checkpoint is written to ``step_N.tmp`` and renamed to ``step_N`` once every rank has
finished; then ``latest`` is replaced atomically (write + rename). A process killed mid-save leaves
``latest`` pointing at the previous complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..comm.distributed import DistContext, copy_into_shard, full_tensor, receives
from ..comm.grads import check_expert_layout, expert_parameter_ids, unwrap
from ..layer import MoE


def _expert_ids(model: nn.Module) -> set[int]:
    return expert_parameter_ids(model)  # frozen experts too: every rank saves its own


def _shard(local: Tensor, ctx: DistContext) -> DTensor:
    """This rank's expert rows as a slice of the single-device tensor (sharded over ep)."""
    return DTensor.from_local(local, ctx.mesh, [Replicate(), Shard(0)], run_check=False)


# Copies loaded values back into shards of the dp replicas (fully_shard's expert tensors).
WriteBacks = list[Callable[[], None]]


def _expert_view(t: Tensor, ctx: DistContext, write_backs: WriteBacks) -> DTensor:
    """An expert tensor (this rank's e experts) as its rows of the single-device [E, ...] tensor.

    Under ``ep.fully_shard`` the experts are also sharded over the dp replicas: they are gathered
    over the replicas first (this rank's experts, one tensor at a time while the state is built),
    and a write-back copies what a load fills in back into this rank's shard.
    """
    if not isinstance(t, DTensor):
        if t.device.type == ctx.mesh.device_type:
            return _shard(t, ctx)  # shares the tensor's storage: a load fills it in place
        # A model on a GPU in a gloo job (a CPU mesh): a DTensor's local tensor must be on its
        # mesh's device, or DCP loads into a copy and the parameter keeps its old values. A copy
        # on the mesh's device is saved and loaded, and a write-back fills the tensor.
        local = t.to(ctx.mesh.device_type)

        def write_back() -> None:
            t.copy_(local)

        write_backs.append(write_back)
        return _shard(local, ctx)
    full = t.full_tensor()  # NOTE: collective over the dp replicas
    write_backs.append(lambda: copy_into_shard(t, full))
    return _shard(full, ctx)


def model_state(model: nn.Module, ctx: DistContext, write_backs: WriteBacks) -> dict[str, Tensor]:
    """Parameters and persistent buffers by name (the state dict's entries, e.g. a router's
    expert_bias); expert tensors as DTensors of the single-device layout sharing the parameters'
    storage (see :func:`_expert_view` for sharded ones); fully_shard's other DTensors as they are."""
    experts = _expert_ids(model)
    persistent = model.state_dict(keep_vars=True)
    state: dict[str, Tensor] = {n: b for n, b in model.named_buffers() if n in persistent}
    for name, p in model.named_parameters():
        state[name] = _expert_view(p.detach(), ctx, write_backs) if id(p) in experts else p.detach()
    return state


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, ctx: DistContext,
                    write_backs: WriteBacks) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, as it is (a parameter without state, e.g. a
    frozen one or any before the first step, has none); expert-shaped state tensors sharded like
    experts. Reads the optimizer only: nothing is stepped or created."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {"state": _named_state(optimizer.state, names, model, ctx, write_backs),
            "param_groups": _named_groups(optimizer, names)}


def _named_state(per_param: Mapping[Any, dict[str, Any]], names: dict[int, str], model: nn.Module,
                 ctx: DistContext, write_backs: WriteBacks) -> dict[str, Any]:
    """``{"<param name>.<key>": value}`` of per-parameter state; expert-shaped tensors as views of
    the single-device layout (:func:`_expert_view`)."""
    experts = _expert_ids(model)
    state: dict[str, Any] = {}
    for p, entries in per_param.items():
        for key, value in entries.items():
            sharded = id(p) in experts and isinstance(value, Tensor) and value.shape == p.shape
            state[f"{names[id(p)]}.{key}"] = _expert_view(value, ctx, write_backs) if sharded else value
    return state


def _named_groups(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[dict[str, Any]]:
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


def _saved_entries(path: Path) -> dict[str, Any]:
    """The checkpoint's optimizer-state entries (``"<param name>.<key>"``) and their storage
    metadata (tensor size and dtype, or bytes for other objects), read from DCP's metadata."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "optim.state."
    return {key[len(prefix):]: md for key, md in metadata.items() if key.startswith(prefix)}


def _template(p: Tensor, md: Any, saved_shape: tuple[int, ...]) -> Any:
    """A tensor to load one saved state entry of parameter ``p`` into: like ``p`` where the saved
    tensor has the parameter's saved shape (``saved_shape``: single-device for an expert), else of
    the saved size on the CPU (the optimizer's own ``load_state_dict`` moves it where it keeps
    it); None for a non-tensor."""
    if not isinstance(md, TensorStorageMetadata):
        return None
    if tuple(md.size) == saved_shape:
        return torch.zeros_like(p, dtype=md.properties.dtype)
    return torch.zeros(tuple(md.size), dtype=md.properties.dtype)


def optimizer_templates(optimizer: torch.optim.Optimizer, model: nn.Module, ctx: DistContext,
                        path: Path) -> dict[Tensor, dict[str, Any]]:
    """Fresh tensors for exactly the state entries the checkpoint holds, per parameter of the
    optimizer (parameters the checkpoint has no state for get none)."""
    saved = _saved_entries(path)
    experts = _expert_ids(model)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    templates: dict[Tensor, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        entries = {key[len(name) + 1:]: md for key, md in saved.items()
                   if key.startswith(f"{name}.") and "." not in key[len(name) + 1:]}
        if id(p) not in optimized or not entries:
            continue
        rows = p.shape[0] * ctx.ep_size if id(p) in experts else p.shape[0] if p.dim() else None
        shape = tuple(p.shape) if rows is None else (rows, *p.shape[1:])
        templates[p] = {key: _template(p, md, shape) for key, md in entries.items()}
    return templates


def optimizer_load_state(optimizer: torch.optim.Optimizer, model: nn.Module, ctx: DistContext,
                         path: Path, write_backs: WriteBacks) -> tuple[dict[str, Any], Callable[[], None]]:
    """The ``optim`` entry for ``dcp.load`` to fill (templates of exactly the checkpoint's state
    entries) and what hands the loaded values to the optimizer afterwards. The optimizer is not
    stepped; its state becomes the checkpoint's (a parameter without saved state has none)."""
    templates = optimizer_templates(optimizer, model, ctx, path)
    names = {id(p): n for n, p in model.named_parameters()}
    entry: dict[str, Any] = {"state": _named_state(templates, names, model, ctx, write_backs),
                             "param_groups": _named_groups(optimizer, names)}

    def install() -> None:
        _install(optimizer, _with_loaded_objects(templates, entry["state"], names), entry["param_groups"])

    return entry, install


def _install(optimizer: torch.optim.Optimizer, loaded: dict[Tensor, dict[str, Any]],
             groups: list[dict[str, Any]]) -> None:
    """Hands the loaded state and hyperparameters to the optimizer's own ``load_state_dict`` (which
    replaces its whole state and puts each tensor where this optimizer keeps it)."""
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(groups)} optimizer param groups, this optimizer "
                         f"{len(optimizer.param_groups)}")
    index: dict[int, int] = {}
    torch_groups = []
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        ids = [index.setdefault(id(p), len(index)) for p in group["params"]]
        torch_groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    state = {index[id(p)]: entries for p, entries in loaded.items()}
    optimizer.load_state_dict({"state": state, "param_groups": torch_groups})


def _rng_states() -> dict[str, Any]:
    """This rank's generators: the CPU one and, where this process uses CUDA, its current device's
    (router jitter, noisy top-k and dropout draw from it when the model is on that GPU)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        states["cuda"] = {"device": index, "state": torch.cuda.get_rng_state(index)}
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    """The CPU generator, and the saved CUDA device's where this process has that device (else a
    warning: that generator keeps its own seed)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is None:
        return
    if torch.cuda.is_available() and cuda["device"] < torch.cuda.device_count():
        torch.cuda.set_rng_state(cuda["state"], cuda["device"])
    else:
        warnings.warn(f"the checkpoint holds the generator of CUDA device {cuda['device']}, which this "
                      f"process does not have: that generator is not restored (the resumed run's "
                      f"dropout and router noise differ from the uninterrupted one's)", stacklevel=3)


def _rng_file(path: Path, ctx: DistContext) -> Path:
    return path / f"rng_rank{ctx.rank}_of{ctx.world_size}.pt"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    ctx: DistContext, step: int, meta: dict[str, Any] | None = None) -> Path:
    """Saves model, optimizer, step, RNG states and ``meta`` as ``directory/step_{step}``.

    Every rank calls it. Returns the checkpoint's path. ``directory/latest`` names it once it is complete.
    """
    model = unwrap(model)  # a DistributedDataParallel's keys without its "module." prefix
    check_expert_layout(model, ctx, "save_checkpoint")
    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    tmp = directory / f"step_{step:08d}.tmp"
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        tmp.mkdir(parents=True)
    dist.barrier(group=ctx.world_group)  # NOTE: collective
    unused: WriteBacks = []
    state: dict[str, Any] = {"model": model_state(model, ctx, unused),
                             "meta": {"step": step, **(meta or {})}}
    if optimizer is not None:
        state["optim"] = optimizer_state(optimizer, model, ctx, unused)
    # NOTE: collective (every rank writes its shards), on the library's own job-wide group
    dcp.save(state, checkpoint_id=tmp, process_group=ctx.world_group)
    torch.save(_rng_states(), _rng_file(tmp, ctx))
    dist.barrier(group=ctx.world_group)  # NOTE: collective: all shards are written before the rename
    if ctx.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(directory / "latest", final.name)
    dist.barrier(group=ctx.world_group)  # NOTE: collective
    return final


def latest_checkpoint(directory: str | Path, ctx: DistContext | None = None) -> Path | None:
    """The last complete checkpoint in ``directory`` (what ``latest`` names), or None.

    With ``ctx`` (every rank calls it), rank 0 reads ``latest`` and broadcasts the answer, so every
    rank resumes from the same step even where ranks would read different files (node-local disks,
    attribute caching on a network filesystem). Every rank must then see that checkpoint: the
    checkpoint directory has to be on a filesystem shared by all nodes.

    Raises:
        FileNotFoundError: on every rank, naming the path and the ranks that cannot see it.
    """
    if ctx is None or ctx.world_size == 1:
        name = _read_latest(Path(directory))
        return None if name is None else Path(directory) / name
    answer: list[Any] = [None, None]  # (name, error): only rank 0 reads, every rank raises alike
    if ctx.rank == 0:
        try:
            answer[0] = _read_latest(Path(directory))
        except OSError as err:
            answer[1] = f"{type(err).__name__}: {err}"
    # NOTE: collective: rank 0's answer for everyone
    dist.broadcast_object_list(answer, src=0, group=ctx.world_group)
    if answer[1] is not None:
        raise FileNotFoundError(f"rank 0 could not read {Path(directory) / 'latest'}: {answer[1]}")
    if answer[0] is None:
        return None
    path = Path(directory) / answer[0]
    blind = torch.tensor([0 if (path / ".metadata").exists() else 1], device=ctx.device)
    gathered = [torch.zeros_like(blind) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, blind, group=ctx.world_group)  # NOTE: collective: who cannot see it
    missing = [r for r, flag in enumerate(gathered) if int(flag.item())]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {path} (named by rank 0's {Path(directory) / 'latest'}) is not readable on "
            f"ranks {missing}: the checkpoint directory must be on a filesystem shared by every node")
    return path


def _read_latest(directory: Path) -> str | None:
    pointer = directory / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    ctx: DistContext, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Loads a checkpoint (any layout) into ``model`` / ``optimizer`` in this layout; returns meta.

    ``meta`` is a template of the caller's extra entries (tensors are filled in place). The RNG state
    of this rank is restored when the checkpoint was written with the same world size.
    """
    model = unwrap(model)  # a DistributedDataParallel's keys without its "module." prefix
    check_expert_layout(model, ctx, "load_checkpoint")
    path = Path(path)
    write_backs: WriteBacks = []
    state: dict[str, Any] = {"model": model_state(model, ctx, write_backs),
                             "meta": {"step": 0, **(meta or {})}}
    install: Callable[[], None] | None = None
    if optimizer is not None:
        state["optim"], install = optimizer_load_state(optimizer, model, ctx, path, write_backs)
    # NOTE: collective; fills the tensors above in place
    dcp.load(state, checkpoint_id=path, process_group=ctx.world_group)
    for write_back in write_backs:
        write_back()
    if install is not None:
        install()
    if _rng_file(path, ctx).exists():
        _restore_rng_states(torch.load(_rng_file(path, ctx)))
    loaded: dict[str, Any] = state["meta"]
    return loaded


def _with_loaded_objects(templates: dict[Tensor, dict[str, Any]], named: dict[str, Any],
                        names: dict[int, str]) -> dict[Tensor, dict[str, Any]]:
    """The templates with their non-tensor entries replaced by what DCP loaded (it fills tensors in
    place but puts other objects into the named dict)."""
    return {p: {key: value if isinstance(value, Tensor) else named[f"{names[id(p)]}.{key}"]
                for key, value in entries.items()} for p, entries in templates.items()}


# ---- single-device export / import ----
def _moe_modules(model: nn.Module) -> dict[str, MoE]:
    return {f"{name}." if name else "": m for name, m in model.named_modules() if isinstance(m, MoE)}


def full_state_dict(model: nn.Module, to_rank: int | None = None) -> dict[str, Tensor]:
    """The model's single-device state dict: every MoE's experts gathered (a collective).

    ``to_rank=None``: every rank gets it; else only global rank ``to_rank`` (the experts are sent
    to it one tensor at a time; the other ranks get ``{}`` and hold nothing more than their own).
    """
    model = unwrap(model)  # a DistributedDataParallel's keys without its "module." prefix
    moes = _moe_modules(model)
    keeps = receives(to_rank)
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if _owner(key, moes) is None:
            value = full_tensor(value)  # NOTE: collective for a DTensor
            if keeps:
                state[key] = value.clone()
    for prefix, moe in moes.items():
        state.update({prefix + k: v for k, v in moe.full_state_dict(to_rank).items()})  # NOTE: collective
    return state


def export_single_device(model: nn.Module, path: str | Path, ctx: DistContext) -> None:
    """Writes the single-device state dict to one file (torch.save, on rank 0, atomically). Only
    rank 0 gathers the experts (one tensor at a time); the other ranks send theirs."""
    state = full_state_dict(model, to_rank=0)
    if ctx.rank == 0:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    dist.barrier(group=ctx.world_group)  # NOTE: collective


def import_single_device(model: nn.Module, path: str | Path) -> None:
    """Loads a single-device state dict file into ``model`` in any layout (each rank its slice)."""
    model = unwrap(model)  # a DistributedDataParallel's keys without its "module." prefix
    state = torch.load(path, map_location="cpu", weights_only=True)
    moes = _moe_modules(model)
    for prefix, moe in moes.items():
        moe.load_full_state_dict({k[len(prefix):]: v for k, v in state.items()
                                  if k.startswith(prefix) and _owner(k, moes) == prefix})
    rest = {k: v for k, v in state.items() if _owner(k, moes) is None}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if _owner(k, moes) is None]
    if missing or unexpected:
        raise ValueError(f"single-device state dict mismatch: missing {missing}, unexpected {unexpected}")


def _owner(key: str, moes: dict[str, MoE]) -> str | None:
    """The prefix of the MoE module that owns ``key`` (longest match), or None."""
    owners = [p for p in moes if key.startswith(p)]  # "" (the model itself is an MoE) matches any key
    return max(owners, key=len) if owners else None
