"""The console script and the demo (the README's main job)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expert_parallel.apps.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_loss_falls(capsys) -> None:
    assert main(["demo", "--steps", "15", "--batch-size", "4", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0]
    counts = [ast.literal_eval(c) for c in re.findall(r"counts (\[[\d, ]+\])", out)]
    assert all(len(c) == 8 for c in counts)


def test_demo_dropless_has_no_drops(capsys) -> None:
    main(["demo", "--steps", "2", "--capacity-factor", "none", "--top-k", "1"])
    out = capsys.readouterr().out
    assert set(re.findall(r"dropped (\d+\.\d+)", out)) == {"0.000"}


def test_example_script_and_info_run_as_processes() -> None:
    example = subprocess.run([sys.executable, str(ROOT / "examples" / "moe_demo.py"), "--steps", "2"],
                             capture_output=True, text=True, timeout=120, check=True)
    assert "step    2" in example.stdout
    info = subprocess.run([sys.executable, "-m", "expert_parallel", "info"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert f"torch {torch.__version__}" in info.stdout


def test_help_describes_every_command(capsys) -> None:
    """`expert-parallel --help`: the description names every sub-command the parser has."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    commands = re.search(r"\{([\w,-]+)\}", out)
    assert commands is not None, out
    names = commands.group(1).split(",")
    assert len(names) == 9, names
    description = out.split("positional arguments:")[0]
    missing = [name for name in names if f"{name} (" not in description]
    assert not missing, (missing, description)
