"""The private torch / transformers / DeepSpeed names the package relies on (expert_parallel/ops/private.py).

Each resolves on the installed versions (an upgrade that moves one fails here, naming it); each
accessor raises PrivateAPIError naming the name, its use and the installed version when the name
is missing (simulated by deleting it); and the package's source uses no private name of another
library that the adapter's list does not hold.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import expert_parallel
from expert_parallel.layer import in_backward
from expert_parallel.ops import private

PACKAGE = Path(expert_parallel.__file__).parent
# Standard-library private names, not a torch upgrade's concern: os._exit is documented; atexit's
# _run_exitfuncs is CPython's (comm/shutdown.py runs the handlers before os._exit).
STDLIB = {"_exit", "_run_exitfuncs"}
# Direct uses outside the adapter in modules whose owners have not moved them behind it yet; each
# name is in PRIVATE_NAMES, so an upgrade that moves it still fails test_each_private_name_resolves.
NOT_YET_BEHIND_THE_ADAPTER = {
    "comm/distributed.py": {"_parameters"},
    "integrations/deepspeed.py": {"_get_expert_parallel_group_dict", "_create_expert_and_data_parallel",
                                  "_get_expert_parallel_group", "_get_expert_data_parallel_group"},
    "integrations/hf.py": {"_keys_to_ignore_on_load_unexpected", "_version"},
}


@pytest.mark.parametrize("entry", private.PRIVATE_NAMES, ids=lambda e: e.name)
def test_each_private_name_resolves(entry: private.PrivateName) -> None:
    if importlib.util.find_spec(entry.package) is None:
        pytest.skip(f"{entry.package} is not installed")
    private.resolve(entry)


def check_error(err: pytest.ExceptionInfo[private.PrivateAPIError], entry: private.PrivateName) -> None:
    """The message names the private name, what it is for, the installed version and the fix."""
    message = str(err.value)
    assert entry.name in message and entry.purpose in message
    assert f"{entry.package} {private._installed_version(entry.package)} does not have" in message
    assert "expert_parallel/ops/private.py" in message


def test_a_missing_graph_task_id_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert in_backward() is False
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    with pytest.raises(private.PrivateAPIError) as err:
        in_backward()
    check_error(err, private.GRAPH_TASK_ID)


def test_a_missing_autograd_callback_queue_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.autograd.Variable, "_execution_engine")
    with pytest.raises(private.PrivateAPIError) as err:
        private.queue_callback(lambda: None)
    check_error(err, private.QUEUE_CALLBACK)


def test_missing_ddp_hooks_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert private.active_ddp_module() is None  # no DDP forward running
    model = nn.Linear(2, 2)
    private.set_ddp_ignored(model, {"bias"})
    assert private.ddp_ignored_names(model) == ["bias"]
    monkeypatch.delattr(DistributedDataParallel, "_get_active_ddp_module")
    monkeypatch.delattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model")
    with pytest.raises(private.PrivateAPIError) as err:
        private.active_ddp_module()
    check_error(err, private.ACTIVE_DDP)
    with pytest.raises(private.PrivateAPIError) as err:
        private.set_ddp_ignored(model, {"weight"})
    check_error(err, private.DDP_SET_IGNORED)


def test_ddp_managed_parameters_fall_back_to_the_ignore_list() -> None:
    """Without DDP's _module_parameters: the wrapped module's trainable parameters not ignored."""

    class FakeDDP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.parameters_to_ignore = {"bias"}

    fake = FakeDDP()
    assert private.ddp_managed_parameters(fake) == [fake.module.weight]


def test_a_missing_module_internal_is_named() -> None:
    module = nn.Module()
    module.register_buffer("kept", torch.zeros(1))
    module.register_buffer("counts", torch.zeros(1), persistent=False)
    assert private.non_persistent_buffer_names(module) == {"counts"}
    object.__delattr__(module, "_non_persistent_buffers_set")
    with pytest.raises(private.PrivateAPIError) as err:
        private.non_persistent_buffer_names(module)
    check_error(err, private.MODULE_NON_PERSISTENT)


def test_grouped_mm_falls_back_by_torch_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """F.grouped_mm (torch >= 2.10), else torch._grouped_mm (2.8, 2.9), else None (the loop)."""
    if hasattr(F, "grouped_mm"):
        assert private.grouped_mm_op() is F.grouped_mm
        monkeypatch.delattr(F, "grouped_mm")
    if hasattr(torch, "_grouped_mm"):
        assert private.grouped_mm_op() is torch._grouped_mm
        monkeypatch.delattr(torch, "_grouped_mm")
    assert private.grouped_mm_op() is None


def test_a_missing_transformers_name_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    import transformers.core_model_loading as loading

    monkeypatch.delattr(loading, "revert_weight_conversion")
    with pytest.raises(private.PrivateAPIError) as err:
        private.revert_weight_conversion(object(), {})
    check_error(err, private.REVERT_CONVERSION)


def test_a_moved_module_or_a_name_torch_stopped_reading_is_named() -> None:
    moved = private.PrivateName("torch", "torch.no_such_module", "thing", "a test", "nowhere")
    with pytest.raises(private.PrivateAPIError, match=r"torch\.no_such_module\.thing \(import failed"):
        private.resolve(moved)
    unread = private.PrivateName("torch", "torch.nn.parallel.distributed",
                                 "DistributedDataParallel._no_such_attribute", "a test", "nowhere",
                                 check="source")
    with pytest.raises(private.PrivateAPIError, match="no longer reads _no_such_attribute"):
        private.resolve(unread)


# ---- the package's source holds no private name the adapter does not list ----
def package_defined(tree: ast.AST) -> set[str]:
    """Names the package defines itself: functions, classes, arguments, module names and the
    attributes it assigns on ``self`` / ``cls``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return names


def private_uses(tree: ast.AST) -> set[str]:
    """Private (single-underscore) attribute names the source reads: ``x._name`` and
    ``getattr(x, "_name", ...)``."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            found.add(node.args[1].value)
    return {n for n in found if n.startswith("_") and not n.startswith("__")}


def foreign_private_uses() -> dict[str, set[str]]:
    """Per module of the package: private names it uses that the package does not define."""
    trees = {p: ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}
    defined = set().union(*(package_defined(t) for t in trees.values()))
    found = {p.relative_to(PACKAGE).as_posix(): private_uses(t) - defined - STDLIB for p, t in trees.items()}
    return {module: names for module, names in found.items() if names}


def listed() -> set[str]:
    """Every part of every listed name (``torch._C``'s ``_C`` included)."""
    return {part for e in private.PRIVATE_NAMES for part in [*e.attribute.split("."), *e.module.split(".")]}


def test_every_private_name_in_the_package_is_listed() -> None:
    """Private names of other libraries appear in the adapter's list, and only the adapter (and
    the modules still waiting to move, NOT_YET_BEHIND_THE_ADAPTER) use them."""
    uses = foreign_private_uses()
    unlisted = {m: names - listed() for m, names in uses.items() if names - listed()}
    assert unlisted == {}, f"private names missing from expert_parallel/ops/private.py: {unlisted}"
    direct = {m: names - NOT_YET_BEHIND_THE_ADAPTER.get(m, set()) for m, names in uses.items()
              if m != "ops/private.py"}
    assert {m: n for m, n in direct.items() if n} == {}, "use them through expert_parallel/ops/private.py"


def test_a_planted_private_use_is_caught() -> None:
    tree = ast.parse("import torch\ntorch._foreach_norm([])\ngetattr(torch, '_dynamo_thing', None)\n")
    assert private_uses(tree) - package_defined(tree) == {"_foreach_norm", "_dynamo_thing"}
