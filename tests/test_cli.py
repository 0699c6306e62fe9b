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
from tests.test_launchers import require

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


BAD_INPUT = {  # the options, and what the one message must say
    "bad router": (["--router", "bogus"], "router='bogus' is invalid: expected one of"),
    "ep size": (["--ep-size", "3"], "ep_size=3 is invalid: expected a positive divisor of the world size"),
    "missing data": (["--data", "no/such/file.txt"], "--data no/such/file.txt: no such file"),
    "not a number": (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
}
LAUNCHERS = {
    "python": lambda args: [sys.executable, "examples/train_lm.py", *args],
    "torchrun": lambda args: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node", "2", "examples/train_lm.py", *args],
    "mpirun": lambda args: ["bash", "launch/mpirun.sh", "2", "examples/train_lm.py", *args],
    "deepspeed": lambda args: ["bash", "launch/deepspeed.sh", "--num_gpus", "2", "--", "examples/train_lm.py",
                               *args],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_bad_input_is_one_message_and_status_2(launcher: str, tmp_path: Path) -> None:
    """Every bad option or missing file: one argparse-style line naming it, printed once (rank 0),
    no traceback from any worker, exit status 2 (as one process; the launchers report their own
    failure: torchrun with its ChildFailedError summary)."""
    import os
    if launcher in ("mpirun", "deepspeed"):
        require({"mpirun": "mpiexec", "deepspeed": "deepspeed"}[launcher])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    for name, (args, message) in BAD_INPUT.items():
        if launcher != "python" and name == "not a number":
            continue  # argparse's own error, the same line under every launcher (checked as one process)
        proc = subprocess.run(LAUNCHERS[launcher]([*args, "--out", str(tmp_path / "run")]), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
        out = proc.stdout + proc.stderr
        errors = [line for line in out.splitlines() if "error: " in line and "expert-parallel" in line]
        assert len(errors) == 1 and message in errors[0], (name, out[-3000:])
        assert proc.returncode == 2 if launcher == "python" else proc.returncode != 0, (name, proc.returncode)
        assert "expert_parallel/" not in out and "[rank0]: Traceback" not in out, (name, out[-3000:])
