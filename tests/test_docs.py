"""The docs run: every ```python block of README.md and docs/*.md runs as written, the shell commands
of their ```bash blocks run with small sizes (or say why not), and every test they cite exists.

A python block runs as one process, or under ``torchrun --nproc-per-node N`` when its first line says
``# torchrun --nproc-per-node N`` (and also as one process when that line says ``or python``), in an
empty directory, with its output checked for tracebacks and the teardown abort. A shell command is
run from a directory that holds the project's examples/ and launch/ (and a copy of docs/bench), so
what it writes stays there; each one's small sizes are appended (argparse keeps the last value).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.procs import ROOT, run

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TORCHRUN = re.compile(r"^# torchrun --nproc-per-node (\d+)\b")
# What the README's commands do before the work: set-up steps, done by the test command itself.
SETUP = re.compile(r"^(python3 -m venv |\. \.venv/bin/activate$|pip install )")
FAILURES = ("Traceback (most recent call last)", "terminate called")


@dataclass(frozen=True)
class Block:
    """A fenced block of a doc: its language and text, and where its opening fence is."""

    path: Path
    line: int
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    start, lang = -1, ""
    for i, line in enumerate(lines):
        if not line.startswith("```"):
            continue
        if start < 0:
            start, lang = i, line[3:].strip()
        else:
            blocks.append(Block(path, start + 1, lang, "\n".join(lines[start + 1:i]) + "\n"))
            start = -1
    assert start < 0, f"{path}:{start + 1}: unclosed fence"
    return blocks


def all_blocks(lang: str) -> list[Block]:
    return [b for doc in DOCS for b in fenced_blocks(doc) if b.lang == lang]


def commands(block: Block) -> list[str]:
    """The block's shell commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", "", block.text)
    found = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s+)#(\s.*|$)", "", line).strip()
        if line:
            found.append(re.sub(r"\s+", " ", line))
    return found


def _env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # python, torchrun, deepspeed, mpiexec, expert-parallel
    env = {"PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _check_clean(out: str, what: str) -> None:
    for failure in FAILURES:
        assert failure not in out, f"{what}: {failure!r} in the output\n{out[-4000:]}"


# ---------------------------------------------------------------------------------------------------
# python blocks


@pytest.mark.parametrize("block", all_blocks("python"), ids=lambda b: b.id)
def test_python_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    first = block.text.splitlines()[0]
    mark = TORCHRUN.match(first)
    ways: dict[str, list[str]] = {}
    if mark:
        ways["torchrun"] = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", mark.group(1)]
    if not mark or "or python" in first:
        ways["python"] = [sys.executable]
    for way, launcher in ways.items():
        where = tmp_path / way
        where.mkdir()
        (where / "block.py").write_text(block.text)
        out = run([*launcher, "block.py"], timeout=240, env=_env(), cwd=where)
        _check_clean(out, f"{block.id} ({way})")


def test_python_blocks_are_found() -> None:
    """The extraction itself: the blocks the docs are known to have, with their launch lines."""
    ids = {b.id: TORCHRUN.match(b.text.splitlines()[0]) is not None for b in all_blocks("python")}
    assert len(ids) >= 6, ids
    assert sum(ids.values()) >= 5, ids  # the expert-parallel ones say how they are launched
    readme = [b for b in all_blocks("python") if b.path.name == "README.md"]
    assert len(readme) == 2 and "import expert_parallel as ep" in readme[1].text


# ---------------------------------------------------------------------------------------------------
# shell commands


@dataclass(frozen=True)
class Run:
    """Run it, with these arguments appended (small sizes)."""

    extra: str = ""


@dataclass(frozen=True)
class Elsewhere:
    """The same command runs in this test (with small sizes)."""

    test: str


@dataclass(frozen=True)
class NotRun:
    """Not run by the tests, and why."""

    reason: str


SMALL_LM = "--steps 3 --eval-every 3 --eval-batches 1"
SMALL_BENCH = "--tokens 64 --d-model 32 --d-ff 64 --repeats 1 --warmup 0 --no-deepspeed"
SMALL_COMPARE = (f"{SMALL_LM} --d-model 32 --n-layers 1 --n-heads 2 --batch-size 4 --seq-len 32 "
                 "--no-plots")

# Every shell command of the docs, as written there (continuations joined, comments dropped).
COMMANDS: dict[str, Run | Elsewhere | NotRun] = {
    # README.md
    'python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.13.0 && pip install -q -e '
    '".[apps]" && OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/train_lm.py '
    '--ep-size 2 --steps 800 --out runs/main': Run(SMALL_LM),
    'python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.13.0 && pip install -q -e '
    '".[test]" && ruff check . && mypy && pytest': NotRun("the test command itself (.ci/run runs it)"),
    # docs/training.md
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/train_lm.py --ep-size 2 "
    "--steps 800 --out runs/main": Run(SMALL_LM),
    "python examples/train_lm.py --steps 100 --out runs/one_process": Run(SMALL_LM),
    "bash launch/mpirun.sh 2 examples/train_lm.py --steps 100 --out runs/mpi": Run(SMALL_LM),
    # docs/results.md
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/compare_ffn.py --ep-size 2 "
    "--steps 400 --eval-every 50 --out runs/compare": Run(SMALL_COMPARE),
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/compare_ffn.py --suite routing "
    "--steps 800 --eval-every 100 --ep-size 2 --out runs/routing": Run(SMALL_COMPARE),
    # docs/benchmarks.md
    "expert-parallel bench --json runs/bench.json": Run(SMALL_BENCH),
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m expert_parallel bench "
    "--json runs/bench_r2.json": Run(SMALL_BENCH),
    "expert-parallel bench --sweep tokens --plot runs/tokens.png --json runs/tokens.json":
        Run(f"{SMALL_BENCH} --values 32,64"),
    "expert-parallel bench --sweep experts --plot runs/experts.png --json runs/experts.json":
        Run(f"{SMALL_BENCH} --values 8,16"),
    "expert-parallel bench --top-k 1 --capacity-factor 1.25 --compile":
        Elsewhere("tests/test_bench.py::test_bench_compile_puts_compiled_beside_eager"),
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m expert_parallel bench --top-k 1 --compile":
        NotRun("compiling on 2 ranks takes minutes; the one-process form runs in test_bench.py and the "
               "compiled expert-parallel layer in test_compile.py"),
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m expert_parallel bench --overlap-probe":
        Elsewhere("tests/test_bench.py::test_overlap_probe_under_torchrun"),
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m expert_parallel compose --ep-size 2 "
    "--json runs/compose_w4.json":
        Elsewhere("tests/test_bench.py::test_compose_command_reports_bytes_times_and_reduction_peaks"),
    # docs/hf.md
    'pip install -e ".[hf]"': NotRun("an install step; the test command installs the hf extra"),
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/finetune_hf.py --family "
    "deepseek_v3 --steps 100": Run("--steps 2 --eval-every 2 --no-plots"),
    "python examples/finetune_hf.py --model runs/finetune_hf/model --steps 20":
        Run("--steps 2 --eval-every 2 --no-plots --out runs/from_saved"),
    "deepspeed --num_gpus 2 examples/finetune_hf.py --steps 100":
        Elsewhere("tests/test_hf.py::test_finetune_example_under_the_deepspeed_launcher_matches_torchrun"),
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 examples/export_memory.py --experts 64 "
    "--layers 8": Elsewhere("tests/test_hf.py::test_streamed_save_keeps_each_rank_near_its_own_experts"),
    "python3.11 -m venv ../autoep-venv": NotRun("a second virtual environment (minutes of installs)"),
    '../autoep-venv/bin/pip install "torch==2.13.0"': NotRun("the second virtual environment"),
    '../autoep-venv/bin/pip install "deepspeed==0.19.8" "transformers==5.5.0" safetensors numpy tqdm':
        NotRun("the second virtual environment"),
    "../autoep-venv/bin/pip install -e . --no-deps": NotRun("the second virtual environment"),
    "../autoep-venv/bin/python examples/hf_vs_autoep.py --all --repeats 3 --out runs/hf_vs_autoep.jsonl":
        NotRun("the second virtual environment; --all takes about 10 minutes"),
    ".venv/bin/python examples/hf_vs_autoep.py --all --repeats 3 --out runs/hf_vs_autoep_524.jsonl":
        NotRun("--all takes about 10 minutes"),
    "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 ../autoep-venv/bin/deepspeed --num_gpus 2 "
    "examples/hf_vs_autoep.py --family mixtral --mode autoep --out runs/hf_vs_autoep.jsonl":
        NotRun("the second virtual environment"),
    # docs/launching.md
    "bash launch/torchrun.sh 4": Run("--steps 2"),
    "bash launch/torchrun.sh 2 examples/train_lm.py --steps 10 --out runs/torchrun": Run(SMALL_LM),
    "NNODES=2 RDZV_ENDPOINT=node001:29400 bash launch/torchrun.sh 8":
        NotRun("needs two hosts; tests/test_launchers.py runs two torchrun agents on this one"),
    "bash launch/deepspeed.sh --num_gpus 2":
        Elsewhere("tests/test_launchers.py::test_launch_scripts_run_the_same_example_with_the_same_numbers"),
    "bash launch/deepspeed.sh --hostfile launch/hostfile.example": NotRun("needs the hosts of a hostfile"),
    "bash launch/mpirun.sh 4": Run("--steps 2"),
    "MPI_HOSTS=node001,node002 bash launch/mpirun.sh 16": NotRun("needs two hosts"),
    "sbatch launch/slurm.sbatch": NotRun("needs SLURM; tests/test_launchers.py checks its syntax"),
    "sudo launch/netns_cluster.sh --nodes 2 --nproc-per-node 2 --rate 200mbit -- examples/train_lm.py "
    "--ep-size 4 --exchange hierarchical --out runs/cluster":
        NotRun("root and network namespaces; tests/test_cluster.py runs the cluster"),
    "sudo launch/netns_cluster.sh --nodes 2 --nproc-per-node 2 --rate 200mbit --stats links.jsonl -- -m "
    "expert_parallel scaling --label 200mbit --out runs/scaling.jsonl":
        NotRun("root and network namespaces; tests/test_cluster.py runs the scaling command there"),
    # docs/scaling.md
    "sudo launch/netns_cluster.sh --nodes 2 --nproc-per-node 2 --rate none -- -m expert_parallel scaling "
    "--label unlimited --steps 10 --out docs/bench/scaling_testbed.jsonl":
        NotRun("root and network namespaces; tests/test_cluster.py runs the scaling command there"),
    "sudo launch/netns_cluster.sh --nodes 2 --nproc-per-node 2 --rate 200mbit -- -m expert_parallel "
    "scaling --label 200mbit --steps 10 --out docs/bench/scaling_testbed.jsonl":
        NotRun("root, network namespaces and minutes at 200 Mbit/s"),
    "expert-parallel plan-cluster --calibrate docs/bench/scaling_testbed.jsonl --plot "
    "docs/images/scaling_testbed.png": Run(),
}


def shell_blocks() -> list[Block]:
    return [b for b in all_blocks("bash") if commands(b)]


def test_every_shell_command_of_the_docs_is_run_or_says_why_not() -> None:
    """A command added to the docs, or changed there, must be entered in COMMANDS; an entry whose
    command is no longer in the docs must go."""
    in_docs = {cmd: b.id for b in shell_blocks() for cmd in commands(b)}
    assert not set(in_docs) - set(COMMANDS), {c: in_docs[c] for c in set(in_docs) - set(COMMANDS)}
    assert not set(COMMANDS) - set(in_docs), set(COMMANDS) - set(in_docs)
    for action in COMMANDS.values():
        if isinstance(action, Elsewhere):
            assert cited_test_exists(action.test), action.test


def _workdir(tmp_path: Path) -> Path:
    """A directory with the project's programs (links) and a copy of docs/bench, written to freely."""
    for name in ("examples", "launch"):
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "docs" / "bench", tmp_path / "docs" / "bench")
    (tmp_path / "docs" / "images").mkdir()
    return tmp_path


def runnable(command: str) -> str:
    segments = command.split(" && ")
    while segments and SETUP.match(segments[0]):
        segments.pop(0)
    return " && ".join(segments)


@pytest.mark.parametrize("block", [b for b in shell_blocks()
                                   if any(isinstance(COMMANDS.get(c), Run) for c in commands(b))],
                         ids=lambda b: b.id)
def test_shell_commands_of_the_docs_run(block: Block, tmp_path: Path) -> None:
    """The block's commands in order, in one directory (a later one may read what an earlier wrote)."""
    where = _workdir(tmp_path)
    for command in commands(block):
        action = COMMANDS[command]
        if isinstance(action, Run):
            line = f"{runnable(command)} {action.extra}".strip()
            out = run(["bash", "-c", line], timeout=300, env=_env(), cwd=where)
            _check_clean(out, f"{block.id}: {line}")


# ---------------------------------------------------------------------------------------------------
# tests cited by the docs

CITED = re.compile(r"(test_\w+\.py)::(\w+)(\*?)")


def cited_test_exists(citation: str) -> bool:
    match = CITED.search(citation)
    assert match is not None, citation
    path = ROOT / "tests" / match.group(1)
    if not path.exists():
        return False
    names = re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M)
    name, prefix = match.group(2), match.group(3) or match.group(2).endswith("_")
    return any(n.startswith(name) if prefix else n == name for n in names)


def test_every_test_the_docs_cite_exists() -> None:
    cited = {m.group(0): doc.name for doc in DOCS for m in CITED.finditer(doc.read_text())}
    assert len(cited) >= 5, cited
    missing = {c: doc for c, doc in cited.items() if not cited_test_exists(c)}
    assert not missing, missing
    assert not cited_test_exists("test_layer.py::test_no_such_test")  # the check can fail
