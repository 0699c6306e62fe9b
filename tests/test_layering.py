"""The package's layers and its shape-letter legend, read from the source with ``ast``.

Layers (a module imports only from its own layer and the ones below): config (1) → ops, the math
(2) → comm, every collective (3) → layer, the MoE module (4) → integrations (5) → apps, the
programs (6). On top of that: config and ops never import torch.distributed, and no library module
imports the programs or the programs' extra (numpy, tqdm, matplotlib). Each rule is also checked to
fail on a planted import, so the checker itself cannot silently pass everything.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import expert_parallel

PACKAGE = Path(expert_parallel.__file__).parent
LAYER_OF_PART = {"config": 1, "ops": 2, "comm": 3, "layer": 4, "join": 4, "integrations": 5, "hf": 5,
                 "apps": 6, "__main__": 6}
PROGRAM_ONLY = ("numpy", "tqdm", "matplotlib")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of a module of the package; the package's own __init__ (the public API) is 5."""
    parts = module.split(".")
    return LAYER_OF_PART[parts[1]] if len(parts) > 1 else 5


def imported_modules(source: str, module: str, is_package: bool) -> list[str]:
    """Absolute names of every module the source imports (anywhere in it), relative ones resolved.

    ``from X import y`` counts as importing X and X.y (y may be a submodule).
    """
    base = module.split(".") if is_package else module.split(".")[:-1]
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            root = base[:len(base) - node.level + 1] if node.level else []
            target = ".".join(root + ([node.module] if node.module else []))
            found.append(target)
            found += [f"{target}.{alias.name}" for alias in node.names]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What the source of ``module`` imports against the layering rules."""
    own = layer(module)
    is_math = module == "expert_parallel.config" or module.startswith("expert_parallel.ops")
    problems = []
    for target in imported_modules(source, module, is_package):
        top = target.split(".")[0]
        if is_math and target.startswith("torch.distributed"):
            problems.append(f"{module} (math) imports {target}")
        if own < 6 and top in PROGRAM_ONLY:
            problems.append(f"{module} (library) imports {target}, a dependency of the programs only")
        if top == "expert_parallel" and target != "expert_parallel":
            if target.split(".")[1] not in LAYER_OF_PART:
                continue  # a name imported from the package's top level, e.g. __version__
            if layer(target) > own:
                problems.append(f"{module} (layer {own}) imports {target} (layer {layer(target)})")
    return problems


def sources() -> list[tuple[str, str, bool]]:
    return [(p.read_text(), module_name(p), p.name == "__init__.py") for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_is_in_a_layer() -> None:
    for _, module, _ in sources():
        layer(module)  # KeyError for a module outside the known layers


def test_the_package_holds_its_layers() -> None:
    found = [v for source, module, pkg in sources() for v in violations(source, module, pkg)]
    assert found == []


@pytest.mark.parametrize(("module", "planted", "expected"), [
    ("expert_parallel.ops.plan", "import torch.distributed as dist", "(math) imports torch.distributed"),
    ("expert_parallel.config", "from torch.distributed import ProcessGroup", "(math) imports"),
    ("expert_parallel.ops.routing", "from torch import distributed", "(math) imports torch.distributed"),
    ("expert_parallel.ops.experts", "from ..comm.exchange import guarded", "(layer 2) imports"),
    ("expert_parallel.layer", "from .apps import bench", "(layer 4) imports expert_parallel.apps"),
    ("expert_parallel.comm.grads", "from ..apps.lm import LanguageModel", "(layer 3) imports"),
    ("expert_parallel.integrations.checkpoint", "import numpy as np", "a dependency of the programs"),
    ("expert_parallel.comm.exchange", "    from tqdm import tqdm", "a dependency of the programs"),
])
def test_a_planted_import_is_caught(module: str, planted: str, expected: str) -> None:
    path = PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
    source = path.read_text()
    assert violations(source, module) == []
    if planted.startswith(" "):  # an import inside a function counts too
        source += f"\n\ndef _planted() -> None:\n{planted}\n"
    else:
        source += f"\n{planted}\n"
    found = violations(source, module)
    assert found and all(expected in problem for problem in found), found


def test_the_library_runs_without_the_programs_extra() -> None:
    """numpy, tqdm and matplotlib made unimportable: the MoE trains a step; the programs refuse
    with an ImportError that names the extra."""
    code = """
import sys
for name in ("numpy", "tqdm", "matplotlib"):
    sys.modules[name] = None
import torch, expert_parallel as ep
moe = ep.MoE(ep.MoEConfig(d_model=8, d_ff=16, num_experts=4))
y, aux = moe(torch.randn(2, 3, 8))
(y.sum() + aux.loss).backward()
print("library ok", moe.experts.w_in.grad.abs().sum().item() > 0)
try:
    import expert_parallel.apps.cli
except ImportError as err:
    print("apps:", err)
"""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "library ok True" in out
    assert 'pip install "expert-parallel[apps]"' in out


# ---- shape letters ----
SUFFIX = re.compile(r"^_?[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Za-z]*[A-Z][A-Za-z]*)$")


def legend() -> dict[str, str]:
    """Letter -> meaning, from the legend in the package docstring (lines of `X  meaning` columns)."""
    doc = expert_parallel.__doc__ or ""
    block = doc.split("Shape suffixes", 1)[1].split("\n\n", 2)[1]
    entries = re.findall(r"(?:^|\s{2,})([A-Za-z])  (\S.*?)(?=\s{2,}[A-Za-z]  |$)", block, flags=re.M)
    letters = [letter for letter, _ in entries]
    assert len(letters) == len(set(letters)), f"a letter is defined twice in the legend: {letters}"
    return dict(entries)


def suffixed_names(source: str) -> set[str]:
    """Names (variables, arguments, attributes, functions) whose last part is a shape suffix."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        name = (node.id if isinstance(node, ast.Name) else node.arg if isinstance(node, ast.arg)
                else node.attr if isinstance(node, ast.Attribute)
                else node.name if isinstance(node, ast.FunctionDef) else None)
        if name and not name.isupper() and SUFFIX.match(name):
            names.add(name)
    return names


def unknown_letters(source: str, letters: dict[str, str]) -> list[str]:
    return sorted(n for n in suffixed_names(source)
                  if any(c not in letters for c in SUFFIX.match(n).group(1)))  # type: ignore[union-attr]


def test_the_legend_gives_each_letter_one_meaning() -> None:
    letters = legend()
    assert {"B", "L", "D", "F", "T", "G", "S", "E", "e", "K", "C", "N", "n", "R"} <= set(letters)
    assert "tokens per routing group" in letters["S"] and "top-k" in letters["K"]


def test_every_shape_suffix_in_the_package_is_in_the_legend() -> None:
    letters = legend()
    found = {module: unknown_letters(source, letters) for source, module, _ in sources()}
    assert {m: names for m, names in found.items() if names} == {}


def test_an_unknown_shape_letter_is_caught() -> None:
    letters = legend()
    assert unknown_letters("x_NQ = y_TD + counts_Re", letters) == ["x_NQ"]
