"""Every private name of torch, transformers and DeepSpeed that the package relies on, in one place.

A private name (a leading underscore, or a module outside the library's documented API) can move
in any release. The package reaches each one through this module only, so an upgrade that moves one
fails here, with an error that names it, what it is for and the version that had it, instead of an
AttributeError deep inside a forward. ``PRIVATE_NAMES`` lists them (docs/architecture.md, "Private
APIs", is the same list); ``tests/test_private_apis.py`` checks that each resolves on the installed
versions.

Layer 2 (math): no import of torch.distributed here. DistributedDataParallel is reached as an
attribute of ``torch.nn.parallel`` when a function runs, transformers and DeepSpeed by name
(``importlib``) when they are needed.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

TESTED = {"torch": "2.11 (GPU machine) to 2.13", "transformers": "5.5 to 5.25", "deepspeed": "0.16 to 0.19"}


class PrivateAPIError(RuntimeError):
    """A private name the package relies on is missing from the installed torch / transformers /
    DeepSpeed (an upgrade moved or removed it)."""


@dataclass(frozen=True)
class PrivateName:
    """One private name: ``module`` imported, then ``attribute`` (dotted) looked up on it.

    ``check`` says what "present" means: "attribute" (it resolves), "instance" (the attribute is set
    on an instance of the class ``module.attribute``'s owner, built without arguments) or "source"
    (the owner class's source code still reads it: attributes torch sets or reads inside a
    constructor that needs a process group).
    """

    package: str
    module: str
    attribute: str
    purpose: str
    used_in: str
    fallback: str = ""
    check: str = "attribute"

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}"

    def missing(self, detail: str = "") -> PrivateAPIError:
        """The error for this name missing from the installed package."""
        version = _installed_version(self.package)
        note = f" ({detail})" if detail else ""
        return PrivateAPIError(
            f"expert_parallel relies on the private {self.package} name {self.name}{note}, which "
            f"{self.package} {version} does not have: an upgrade moved or removed it. It is used for "
            f"{self.purpose} ({self.used_in}). Install a {self.package} that has it (tested: "
            f"{TESTED.get(self.package, '?')}) or update expert_parallel/ops/private.py for this release.")


def _installed_version(package: str) -> str:
    try:
        return str(importlib.import_module(package).__version__)
    except ImportError:
        return "(not installed)"


_DDP = "torch.nn.parallel.distributed"
GRAPH_TASK_ID = PrivateName(
    "torch", "torch._C", "_current_graph_task_id", "telling a recomputation inside the backward "
    "(activation checkpointing) from a forward", "layer.in_backward, comm/ddp_sync.py")
QUEUE_CALLBACK = PrivateName(
    "torch", "torch.autograd", "Variable._execution_engine.queue_callback", "running the experts' "
    "gradient reduction when the autograd pass ends", "comm/ddp_sync.py, integrations/hf_trainer.py")
ACTIVE_DDP = PrivateName(
    "torch", _DDP, "DistributedDataParallel._get_active_ddp_module", "finding the "
    "DistributedDataParallel whose forward is running", "layer.MoE._ddp_sync_eager")
DDP_MANAGED = PrivateName(
    "torch", _DDP, "DistributedDataParallel._module_parameters", "checking that a DDP does not manage "
    "the experts", "layer.MoE._ddp_sync_eager", fallback="the module's trainable parameters not in "
    "DDP's parameters_to_ignore", check="source")
DDP_SET_IGNORED = PrivateName(
    "torch", _DDP, "DistributedDataParallel._set_params_and_buffers_to_ignore_for_model",
    "leaving the experts out of DDP", "integrations/ddp.py prepare_ddp")
DDP_IGNORED = PrivateName(
    "torch", _DDP, "DistributedDataParallel._ddp_params_and_buffers_to_ignore", "the model attribute "
    "that DDP reads the names to leave out from", "integrations/ddp.py prepare_ddp", check="source")
GROUPED_MM = PrivateName(
    "torch", "torch", "_grouped_mm", "the grouped expert GEMM on torch 2.8 and 2.9",
    "ops/experts.py", fallback="torch.nn.functional.grouped_mm (torch >= 2.10), else the segment loop")
MODULE_PARAMETERS = PrivateName(
    "torch", "torch.nn", "Module._parameters", "the direct parameters of a module without FSDP2's "
    "state_dict hooks", "comm/distributed.py unsharded", check="instance")
MODULE_NON_PERSISTENT = PrivateName(
    "torch", "torch.nn", "Module._non_persistent_buffers_set", "which buffers a state dict leaves "
    "out", "layer.MoE._replicated_state", check="instance")
TENSOR_VERSION = PrivateName(
    "torch", "torch", "Tensor._version", "whether a load changed any tensor in place",
    "integrations/hf.py")
REVERT_CONVERSION = PrivateName(
    "transformers", "transformers.core_model_loading", "revert_weight_conversion", "transformers' "
    "checkpoint names and per-expert tensors when exporting", "integrations/hf_export.py")
REMOVE_TIED = PrivateName(
    "transformers", "transformers.modeling_utils", "remove_tied_weights_from_state_dict", "writing tied "
    "weights once when exporting", "integrations/hf_export.py")
FILE_SIZE = PrivateName(
    "transformers", "transformers.utils.hub", "convert_file_size_to_int", "reading max_shard_size "
    "('5GB')", "integrations/hf_export.py")
KEYS_NOT_SAVED = PrivateName(
    "transformers", "transformers.modeling_utils", "PreTrainedModel._keys_to_ignore_on_save", "the keys "
    "transformers never saves", "integrations/hf_export.py")
KEYS_UNEXPECTED = PrivateName(
    "transformers", "transformers.modeling_utils", "PreTrainedModel._keys_to_ignore_on_load_unexpected",
    "the checkpoint keys transformers ignores on load", "integrations/hf.py")
DEEPSPEED_GROUPS = tuple(PrivateName(
    "deepspeed", "deepspeed.utils.groups", name, "matching DeepSpeed's expert groups with ours",
    "integrations/deepspeed.py") for name in ("_get_expert_parallel_group_dict",
                                             "_create_expert_and_data_parallel",
                                             "_get_expert_parallel_group", "_get_expert_data_parallel_group"))

PRIVATE_NAMES: tuple[PrivateName, ...] = (
    GRAPH_TASK_ID, QUEUE_CALLBACK, ACTIVE_DDP, DDP_MANAGED, DDP_SET_IGNORED, DDP_IGNORED, GROUPED_MM,
    MODULE_PARAMETERS, MODULE_NON_PERSISTENT, TENSOR_VERSION, REVERT_CONVERSION, REMOVE_TIED, FILE_SIZE,
    KEYS_NOT_SAVED, KEYS_UNEXPECTED, *DEEPSPEED_GROUPS)


def resolve(entry: PrivateName) -> Any:
    """The object ``entry`` names (for "instance": its owner class; "source": the owner class,
    after checking that its source reads the name).

    Raises:
        PrivateAPIError: naming the entry, when its module or any part of the name is missing.
    """
    try:
        obj: Any = importlib.import_module(entry.module)
    except ImportError as err:
        raise entry.missing(f"import failed: {err}") from None
    parts = entry.attribute.split(".")
    owner_parts = parts if entry.check == "attribute" else parts[:-1]
    for part in owner_parts:
        obj = _get(obj, part, entry)
    if entry.check == "instance":
        _get(obj(), parts[-1], entry)
    elif entry.check == "source" and parts[-1] not in inspect.getsource(obj):
        raise entry.missing(f"{'.'.join(owner_parts)} no longer reads {parts[-1]}")
    return obj


def _get(owner: Any, attribute: str, entry: PrivateName) -> Any:
    """``getattr(owner, attribute)``, a PrivateAPIError naming ``entry`` where it is missing."""
    try:
        return getattr(owner, attribute)
    except AttributeError:
        raise entry.missing() from None


# ---- torch: autograd ----
def current_graph_task_id() -> int:
    """The id of the autograd pass running on this thread, -1 outside a backward."""
    return int(_get(torch._C, "_current_graph_task_id", GRAPH_TASK_ID)())


def queue_callback(callback: Callable[[], None]) -> None:
    """Runs ``callback`` when the autograd pass running now ends (call it from a backward hook)."""
    engine = _get(torch.autograd.Variable, "_execution_engine", QUEUE_CALLBACK)
    _get(engine, "queue_callback", QUEUE_CALLBACK)(callback)


# ---- torch: DistributedDataParallel ----
def active_ddp_module() -> nn.Module | None:
    """The DistributedDataParallel whose forward is running, or None."""
    ddp = torch.nn.parallel.DistributedDataParallel
    found: nn.Module | None = _get(ddp, "_get_active_ddp_module", ACTIVE_DDP)()
    return found


def ddp_managed_parameters(ddp: nn.Module) -> list[Tensor]:
    """The parameters a DistributedDataParallel broadcasts and averages: its ``_module_parameters``,
    else (a torch without it) the wrapped module's trainable parameters that it does not ignore."""
    managed = getattr(ddp, "_module_parameters", None)
    if managed is not None:
        return list(managed)
    ignored: set[str] = set(getattr(ddp, "parameters_to_ignore", ()))
    module: nn.Module = getattr(ddp, "module", ddp)
    return [p for n, p in module.named_parameters() if p.requires_grad and n not in ignored]


def ddp_ignored_names(model: nn.Module) -> list[str]:
    """The names DDP leaves out of ``model`` (set by :func:`set_ddp_ignored`), or []."""
    return list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))


def set_ddp_ignored(model: nn.Module, names: Iterable[str]) -> None:
    """Makes every DistributedDataParallel built on ``model`` leave these parameters and buffers
    alone (no broadcast, no gradient averaging)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    _get(ddp, "_set_params_and_buffers_to_ignore_for_model", DDP_SET_IGNORED)(model, sorted(names))


# ---- torch: modules and kernels ----
def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """The names of ``module``'s own buffers that its state dict leaves out."""
    return set(_get(module, "_non_persistent_buffers_set", MODULE_NON_PERSISTENT))


def grouped_mm_op() -> Callable[..., Tensor] | None:
    """torch's grouped GEMM: ``F.grouped_mm`` (public from torch 2.10), ``torch._grouped_mm`` on 2.8
    and 2.9, None before (plain getattr: torch.compile folds it to a constant)."""
    found: Callable[..., Tensor] | None = (getattr(torch.nn.functional, "grouped_mm", None)
                                           or getattr(torch, "_grouped_mm", None))
    return found


# ---- transformers ----
def revert_weight_conversion(model: Any, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' conversion of a model's state dict back to its checkpoint names and layout."""
    converted: dict[str, Tensor] = resolve(REVERT_CONVERSION)(model, state)
    return converted


def remove_tied_weights(state: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
    """The state dict with each group of tied weights kept once, as transformers saves it."""
    kept: dict[str, Tensor] = resolve(REMOVE_TIED)(state, model)
    return kept


def file_size_to_int(size: int | str) -> Any:
    """transformers' reading of a size such as "5GB" (bytes; the caller checks the result)."""
    return resolve(FILE_SIZE)(size)


def keys_not_saved(model: Any) -> tuple[str, ...]:
    """The state-dict keys transformers never saves for ``model`` (its class's list)."""
    resolve(KEYS_NOT_SAVED)
    return tuple(getattr(model, "_keys_to_ignore_on_save", None) or ())
