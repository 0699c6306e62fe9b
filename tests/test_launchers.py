"""The same worker under every launcher, as real processes, checking numbers (EP == single device).

Each run executes a few cases of tests/workers/ep_equivalence.py plus its 20-step training check, and
the worker asserts that init_distributed named the launcher that really started it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import astuple

import pytest

from expert_parallel.comm.distributed import first_slurm_host, launch_env
from tests.procs import ROOT, WORKERS, run, run_all

CASES = ["--cases", "topk_k2_capacity_drops", "topk_k2_dropless", "expert_choice", "soft"]
NEEDS_EXTRAS = "installed by the README's test command (pip install -e '.[test]')"


def require(tool: str) -> str:
    """Path of an executable; in CI a missing one is a failure, elsewhere a skip."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} not found; it is {NEEDS_EXTRAS}")
        pytest.skip(f"{tool} not found ({NEEDS_EXTRAS})")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker(*args: str) -> list[str]:
    return [sys.executable, str(WORKERS / "ep_equivalence.py"), *args]


def test_torchrun_two_nodes_c10d_loopback() -> None:
    """Two node agents, as two machines would run them, meeting at a c10d rendezvous on loopback."""
    endpoint = f"127.0.0.1:{free_port()}"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", uuid.uuid4().hex,
             str(WORKERS / "ep_equivalence.py"), "--ep-size", "2", *CASES]
    outs = run_all([agent, agent], timeout=240)  # inside pytest's 300 s: the tails get printed
    assert any("ALL OK 5 under torchrun with 2 ranks" in out for out in outs), outs


def test_hierarchical_exchange_two_node_agents_no_extra_argument() -> None:
    """Two torchrun agents of 2 ranks each: the hierarchical exchange takes its nodes from torchrun's
    LOCAL_WORLD_SIZE (no --ranks-per-node) and equals the reference and the flat exchange."""
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex

    def agent(is_host: int) -> list[str]:  # one store host named: no race for the port between them
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
                "--rdzv-conf", f"is_host={is_host}", str(WORKERS / "ep_equivalence.py"), "--ep-size", "4",
                "--exchange", "hierarchical", "--cases", "topk_k2_dropless", "deepseek_v3_capacity",
                "expert_choice"]

    outs = run_all([agent(1), agent(0)], timeout=240)  # inside pytest's 300 s: the tails get printed
    assert any("ALL OK 4 under torchrun with 4 ranks" in out for out in outs), outs


def _netns_supported() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    name = f"eptest{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], check=False)
    return None


def test_torchrun_two_hosts_in_network_namespaces() -> None:
    """Two namespaces with their own addresses joined by a veth pair: two real hosts to gloo."""
    reason = _netns_supported()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b, veth_a, veth_b = f"epa{tag}", f"epb{tag}", f"va{tag}", f"vb{tag}"
    addr_a, addr_b = "10.231.7.1", "10.231.7.2"
    setup = [["ip", "netns", "add", ns_a], ["ip", "netns", "add", ns_b],
             ["ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b],
             ["ip", "link", "set", veth_a, "netns", ns_a], ["ip", "link", "set", veth_b, "netns", ns_b],
             ["ip", "-n", ns_a, "addr", "add", f"{addr_a}/24", "dev", veth_a],
             ["ip", "-n", ns_b, "addr", "add", f"{addr_b}/24", "dev", veth_b],
             ["ip", "-n", ns_a, "link", "set", veth_a, "up"], ["ip", "-n", ns_b, "link", "set", veth_b, "up"],
             ["ip", "-n", ns_a, "link", "set", "lo", "up"], ["ip", "-n", ns_b, "link", "set", "lo", "up"]]
    try:
        for cmd in setup:
            subprocess.run(cmd, check=True, capture_output=True)
        port, rdzv_id = 29400 + os.getpid() % 1000, uuid.uuid4().hex

        def agent(ns: str, addr: str, is_host: int) -> list[str]:
            return ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
                    "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"{addr_a}:{port}", "--rdzv-id", rdzv_id,
                    "--rdzv-conf", f"is_host={is_host}", "--local-addr", addr,
                    str(WORKERS / "ep_equivalence.py"), "--ep-size", "2", *CASES]

        outs = run_all([agent(ns_a, addr_a, 1), agent(ns_b, addr_b, 0)], timeout=300,
                       envs=[{"GLOO_SOCKET_IFNAME": veth_a}, {"GLOO_SOCKET_IFNAME": veth_b}])
        assert any("ALL OK 5 under torchrun with 2 ranks" in out for out in outs), outs
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_deepspeed_launcher() -> None:
    deepspeed = require("deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
           str(WORKERS / "ep_equivalence.py"), "--ep-size", "2", "--launcher", "deepspeed", *CASES]
    out = run(cmd, timeout=300, env={"DS_ACCELERATOR": "cpu"})
    assert "ALL OK 5 under deepspeed with 2 ranks" in out, out[-3000:]


def test_deepspeed_engine_zero1_and_zero2_equal_plain_path() -> None:
    """10 steps of deepspeed.initialize (ZeRO 1, then 2) at ep 2 x dp 2 == 10 plain steps."""
    deepspeed = require("deepspeed")
    cmd = [deepspeed, "--num_gpus", "4", "--master_port", str(free_port()),
           str(WORKERS / "deepspeed_engine.py"), "--ep-size", "2"]
    out = run(cmd, timeout=400, env={"DS_ACCELERATOR": "cpu"})
    assert "ok ZeRO stage 1" in out and "ok ZeRO stage 2" in out and "ALL OK" in out, out[-3000:]


@pytest.mark.parametrize("ranks, ep_size", [(2, 2), (4, 2)])
def test_mpiexec(ranks: int, ep_size: int) -> None:
    mpiexec = require("mpiexec")
    cmd = [mpiexec, "-n", str(ranks), *worker("--ep-size", str(ep_size), "--launcher", "mpi", *CASES)]
    out = run(cmd, timeout=300)
    assert f"ALL OK 5 under mpi with {ranks} ranks" in out, out[-3000:]


def test_srun_environment_runs_the_worker() -> None:
    """Tasks started with the variables srun gives them (no SLURM here, so we start them)."""
    job = str(40000 + os.getpid() % 1000)
    envs = [{"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
             "SLURM_STEP_ID": "0", "SLURM_JOB_ID": job, "SLURM_JOB_NUM_NODES": "1",
             "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS_PER_NODE": "2"} for r in range(2)]
    cmd = worker("--ep-size", "2", "--launcher", "slurm", *CASES)
    outs = run_all([cmd, cmd], timeout=300, envs=envs)
    assert "ALL OK 5 under slurm with 2 ranks" in outs[0], outs[0][-3000:]


def test_launch_env_parsing() -> None:
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "4",
             "SLURM_JOB_NODELIST": "gpu[007-010],cpu1"}
    env = launch_env(slurm)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == (
        "slurm", 5, 8, 1, 2)
    assert (env.master_addr, env.master_port) == ("gpu007", 20000 + 123456 % 20000)
    assert launch_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}).master_port == 1234
    # a batch script without srun has no job step: not a launch of many tasks
    assert launch_env({k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}).launcher == "none"
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert astuple(launch_env(ompi))[:5] == ("mpi", 3, 4, 1, 2)
    hydra = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    assert astuple(launch_env(hydra))[:5] == ("mpi", 1, 2, 1, 2)
    ds = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "CROSS_RANK": "1", "LOCAL_SIZE": "2"}
    assert astuple(launch_env(ds))[:5] == ("deepspeed", 2, 4, 0, 2)
    tr = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
          "LOCAL_WORLD_SIZE": "2", **slurm}  # torchrun inside an srun allocation: torchrun wins
    assert astuple(launch_env(tr))[:5] == ("torchrun", 1, 2, 1, 2)
    assert astuple(launch_env({}))[:5] == ("none", 0, 1, 0, 1)


@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"), ("a1,b2", "a1"), ("node[003-005,9],gpu1", "node003"),
    ("gpu-[3,5-7]", "gpu-3"), ("n[1-2]-ib,x", "n1-ib"), ("c[08-10]", "c08")])
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_info_names_launcher() -> None:
    out = run([sys.executable, "-m", "expert_parallel", "info"], timeout=120)
    assert "launcher none" in out and "backend gloo" in out


def _last_step(out: str) -> str:
    return [line for line in out.splitlines() if line.startswith("step    3")][-1]


def test_launch_scripts_run_the_same_example_with_the_same_numbers() -> None:
    """launch/*.sh run examples/moe_demo.py unchanged; every 2-rank launcher gives the same step."""
    require("mpiexec")
    require("deepspeed")
    runs = {
        "torchrun": ["bash", "launch/torchrun.sh", "2", "--steps", "3"],
        "mpi": ["bash", "launch/mpirun.sh", "2", "--steps", "3"],
        "deepspeed": ["bash", "launch/deepspeed.sh", "--num_gpus", "2", "--", "--steps", "3"],
    }
    lines = {}
    for launcher, cmd in runs.items():
        out = run(cmd, timeout=300, env={"DS_ACCELERATOR": "cpu"})
        assert f"2 rank(s) launched by {launcher}" in out, out[-3000:]
        lines[launcher] = _last_step(out)
    assert len(set(lines.values())) == 1, lines  # DeepSpeed's engine included
    single = run(["bash", "launch/python.sh", "--steps", "3"], timeout=120)
    assert "1 rank(s) launched by none" in single and _last_step(single)
    syntax = subprocess.run(["bash", "-n", "launch/slurm.sbatch"], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_launch_scripts_take_the_program_train_lm_gives_torchrun_numbers(tmp_path) -> None:
    """The launch scripts run the program they are given (here the main job, examples/train_lm.py,
    with its options), and the main job under every launcher gives torchrun's numbers."""
    require("mpiexec")
    require("deepspeed")
    args = ["--steps", "4", "--eval-every", "4", "--eval-batches", "1", "--batch-size", "4",
            "--seq-len", "32", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--no-plots"]
    program = "examples/train_lm.py"
    runs = {"torchrun": ["bash", "launch/torchrun.sh", "2", program],
            "mpi": ["bash", "launch/mpirun.sh", "2", program],
            "deepspeed": ["bash", "launch/deepspeed.sh", "--num_gpus", "2", "--", program],
            "none": ["bash", "launch/python.sh", program]}
    for name, cmd in runs.items():
        run([*cmd, *args, "--out", str(tmp_path / name)], timeout=300, env={"DS_ACCELERATOR": "cpu"})
    finals = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
              for name in runs}
    assert {name: rec["step"] for name, rec in finals.items()} == dict.fromkeys(runs, 4)
    losses = {name: rec["loss"] for name, rec in finals.items()}
    assert max(losses.values()) - min(losses.values()) < 1e-5, losses
    for bad in (["bash", "launch/mpirun.sh", "2", "examples/nope.py"], ["bash", "launch/python.sh", "-m"]):
        failed = subprocess.run(bad, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert failed.returncode == 2 and "launch:" in failed.stderr, failed
