"""Writing an expert-parallel transformers model as transformers' own checkpoint, streamed.

The model is gathered one piece at a time and only onto the rank that writes: first the replicated
tensors (attention, embeddings, routers, shared experts: every rank already holds them), then each
MoE block's experts, each rank's rows converted to the family's layout on that rank and sent
point-to-point to the writing rank (``gather_rows_to``), written to their own safetensors file
before the next block is gathered. The writing rank holds at most one
block's experts beyond its own model (plus one shard of replicated tensors on the host when the
model is on a GPU); the other ranks hold nothing beyond their own experts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm.distributed import DistContext, full_tensor, gather_rows_to, in_group, job_group, receives
from ..ops.private import file_size_to_int, keys_not_saved, remove_tied_weights, revert_weight_conversion
from .hf import ExpertParallelBlock

DEFAULT_MAX_SHARD_SIZE = "5GB"
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _blocks(model: nn.Module) -> dict[str, ExpertParallelBlock]:
    return {f"{name}." if name else "": block for name, block in model.named_modules()
            if isinstance(block, ExpertParallelBlock)}


def hf_state_chunks(model: nn.Module, to_rank: int | None = None) -> Iterator[dict[str, Tensor]]:
    """transformers' internal layout of ``model``, in pieces: the replicated tensors, then each
    expert-parallel block's experts (every expert, in the family's fused tensors).

    ``to_rank=None``: every rank gets every piece (gathered with all-gathers); else only global rank
    ``to_rank`` does (the others get empty dicts and keep nothing). A collective: every rank of the
    job iterates it to the end. Tensors are detached, not copied where they already are whole.
    """
    blocks = _blocks(model)
    ours = tuple(prefix + "moe." for prefix in blocks)
    keeps = receives(to_rank)
    rest: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if not key.startswith(ours):
            value = full_tensor(value)  # NOTE: collective for a DTensor (ep.fully_shard's shards)
            if keeps:  # the others drop what they gathered at once
                rest[key] = value
    yield rest
    del rest
    for prefix, block in blocks.items():
        moe = block.moe
        if to_rank is None:
            full = moe.full_state_dict()  # NOTE: collective (all-gather)
            experts = {k.removeprefix("experts."): v for k, v in full.items() if k.startswith("experts.")}
            yield {f"{prefix}experts.{k}": v for k, v in block.layout.to_hf(experts).items()}
            continue
        # NOTE: collective over the dp replicas for a DTensor (ep.fully_shard's shards)
        local = {name: full_tensor(value) for name, value in moe.experts.state_dict().items()}
        gathered: dict[str, Tensor] = {}
        if in_group(moe.ep_group, to_rank):  # ranks of the other replicas have nothing to send
            # Each rank converts its own rows (every layout converts expert by expert), so the
            # writing rank receives the family's tensors and converts nothing.
            converted = block.layout.to_hf(local)
            for key in list(converted):
                whole = gather_rows_to(converted.pop(key), moe.ep_group, to_rank)  # NOTE: collective
                if whole is not None and keeps:  # (without a group every rank has them: one keeps)
                    gathered[f"{prefix}experts.{key}"] = whole
        yield gathered
        del local, gathered


def hf_state_dict(model: nn.Module, to_rank: int | None = None) -> dict[str, Tensor]:
    """The unmodified model's state dict (transformers' internal layout), every expert gathered,
    copied to the host.

    A collective over each block's expert-parallel group: every rank calls it. ``to_rank=None``:
    every rank gets it; else only global rank ``to_rank`` (the others get ``{}`` and hold nothing
    beyond their own experts meanwhile).
    """
    state: dict[str, Tensor] = {}
    for chunk in hf_state_chunks(model, to_rank):
        state.update({k: v.to("cpu", copy=True) for k, v in chunk.items()})
    return state


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (8-byte header length, JSON header, raw little-endian data), written
    tensor by tensor from the tensors' own memory (one host copy at a time for device tensors).

    Not ``safetensors.torch.save_file``: it first serialises the whole file into bytes in memory,
    a second copy of the shard on the writing rank. Files are read back with safetensors' own
    ``safe_open`` (and by transformers) in the tests.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, value in tensors.items():
        if value.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {value.dtype} has no safetensors name")
        size = value.numel() * value.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for value in tensors.values():
            host = value.detach().to("cpu").contiguous().reshape(-1)
            if host.numel():
                f.write(host.view(torch.uint8).numpy().data)


class _ShardWriter:
    """Writes safetensors shards of at most ``max_bytes`` (a tensor larger than that gets a shard of
    its own) under temporary names; :meth:`finish` names them as transformers does and writes the
    index."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = self.total_params = 0

    def add(self, tensors: dict[str, Tensor]) -> None:
        for key, value in tensors.items():
            size = value.numel() * value.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self.flush()
            self.pending[key] = value
            self.pending_bytes += size
            self.total_bytes += size
            self.total_params += value.numel()

    def flush(self) -> None:
        """Writes what is pending as one safetensors file."""
        if not self.pending:
            return
        path = self.directory / f".model-{len(self.files) + 1:05d}.safetensors.tmp"
        write_safetensors(path, self.pending, metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0


    def finish(self) -> None:
        """Final names (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and
        ``model.safetensors.index.json``); the previous save's shards that were not replaced are
        removed."""
        self.flush()
        n = len(self.files)
        names = ([f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] if n > 1
                 else ["model.safetensors"])
        for (tmp, _), name in zip(self.files, names, strict=True):
            os.replace(tmp, self.directory / name)
        single, index = self.directory / "model.safetensors", self.directory / "model.safetensors.index.json"
        stale = [p for p in self.directory.iterdir() if _SHARD_NAME.fullmatch(p.name) and p.name not in names]
        stale += [index] if n == 1 and index.exists() else []
        stale += [single] if n > 1 and single.exists() else []
        for path in stale:
            path.unlink()
        if n > 1:
            weight_map = {key: name for (_, keys), name in zip(self.files, names, strict=True)
                          for key in keys}
            body = {"metadata": {"total_size": self.total_bytes, "total_parameters": self.total_params},
                    "weight_map": dict(sorted(weight_map.items()))}
            index.write_text(json.dumps(body, indent=2) + "\n")


def _to_checkpoint_names(model: Any, chunk: dict[str, Tensor], first: bool) -> dict[str, Tensor]:
    """transformers' own saving steps for one piece: keys it never saves dropped, tied weights kept
    once (first piece: the replicated tensors), its weight conversions reverted (the checkpoint's
    names and per-expert tensors for families whose released checkpoints have them)."""
    for key in keys_not_saved(model):
        chunk.pop(key, None)
    if first:
        chunk = remove_tied_weights(chunk, model)
    return revert_weight_conversion(model, chunk)


def _write_config(model: Any, directory: Path) -> None:
    """config.json (with the dtype and architecture, as transformers writes them) and, for models
    that generate, generation_config.json."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(directory))
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(directory))


def save_pretrained(model: nn.Module, path: str | Path, ctx: DistContext | None = None, *,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Writes a directory that plain transformers loads (``AutoModelForCausalLM.from_pretrained``),
    without expert_parallel installed: transformers' checkpoint names and layout (its weight
    conversions reverted, tied weights once), DeepSeek's (and GLM's) trained bias in
    ``e_score_correction_bias``. Every rank calls it (a collective); global rank 0 writes.

    Streamed: the replicated tensors, then each block's experts gathered to rank 0 and written
    before the next block is gathered, in safetensors shards of at most ``max_shard_size`` (bytes,
    or a string such as "5GB") with each block's experts in shards of their own.
    """
    max_bytes = file_size_to_int(max_shard_size)
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_shard_size={max_shard_size!r} is invalid: expected a positive size "
                         "(bytes, or a string such as '5GB')")
    # Without a ctx in a job of several processes, the default group's ranks (rank 0 writes).
    world = ctx.world_size if ctx is not None else (dist.get_world_size() if dist.is_initialized() else 1)
    rank = ctx.rank if ctx is not None else (dist.get_rank() if dist.is_initialized() else 0)
    leader = rank == 0
    directory = Path(path)
    writer = _ShardWriter(directory, max_bytes) if leader else None
    if writer is not None:
        directory.mkdir(parents=True, exist_ok=True)
    spread = world > 1
    for i, chunk in enumerate(hf_state_chunks(model, to_rank=0 if spread else None)):
        if writer is not None and chunk:
            writer.add(_to_checkpoint_names(model, chunk, first=i == 0))
            writer.flush()  # this piece is on disk before the next one is gathered
        del chunk
    if writer is not None:
        writer.finish()
        _write_config(model, directory)
    if spread:
        dist.barrier(group=job_group())  # NOTE: collective: the directory is complete on any return


__all__ = ["hf_state_chunks", "hf_state_dict", "save_pretrained"]
