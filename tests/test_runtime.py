"""Runtime promises for real jobs: the backend rule, one health group per set of ranks, resuming from
rank 0's checkpoint, verified replicas, no gradient for unused parameters, device discipline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import expert_parallel as ep
from tests.procs import torchrun
from tests.workers.runtime import SCENARIOS, FactoryWatch


class _ReachedInitError(Exception):
    """Raised by the stand-in of init_process_group: what init_distributed did up to there is the
    behaviour under test (a CPU machine cannot start NCCL)."""


def _start_with(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], gpus: int,
                backend: str | None = None) -> tuple[list[int], str | None]:
    """Runs ep.init_distributed in this process as a rank with ``env`` (a launcher's variables) on
    a machine that shows ``gpus`` CUDA devices; returns the devices it bound and the backend it
    created the default group with (None if it raised before)."""
    import torch.distributed as dist

    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                 "CROSS_RANK", "LOCAL_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                 "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bound: list[int] = []
    created: list[str] = []

    def init_process_group(backend: str, *args: object, **kwargs: object) -> None:
        created.append(backend)
        raise _ReachedInitError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(_ReachedInitError):
        ep.init_distributed(backend=backend)
    return bound, created[0] if created else None


def torchrun_env(local_rank: int, local_world: int) -> dict[str, str]:
    return dict(TORCHELASTIC_RUN_ID="t", RANK=str(local_rank), WORLD_SIZE=str(local_world),
                LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_world), MASTER_ADDR="127.0.0.1",
                MASTER_PORT="29999")


@pytest.mark.parametrize(("gpus", "visible", "local_rank", "device"), [
    (1, "CUDA_VISIBLE_DEVICES=3", 3, 0),  # SLURM --gpus-per-task=1: each task's own GPU 0
    (1, "NVIDIA_VISIBLE_DEVICES=GPU-5e1a", 2, 0),  # a Kubernetes device plugin's container
    (4, "", 3, 3),  # every rank sees the node's GPUs: rank i takes GPU i
    (8, "", 3, 3),
])
def test_a_rank_with_a_gpu_of_its_own_binds_it_and_starts_nccl(monkeypatch: pytest.MonkeyPatch, gpus: int,
                                                               visible: str, local_rank: int,
                                                               device: int) -> None:
    env = torchrun_env(local_rank, 4)
    if visible:
        name, value = visible.split("=")
        env[name] = value
    bound, backend = _start_with(monkeypatch, env, gpus)
    assert bound == [device] and backend == "cpu:gloo,cuda:nccl"


@pytest.mark.parametrize(("gpus", "local_world"), [(1, 2), (2, 4), (0, 2)])
def test_ranks_that_would_share_a_gpu_stay_on_gloo(monkeypatch: pytest.MonkeyPatch, gpus: int,
                                                   local_world: int) -> None:
    """torchrun --nproc-per-node 2 on a one-GPU machine (every rank sees the same GPUs, none has its
    own), or no GPU at all: gloo, as before; backend='nccl' still binds local_rank % count (and then
    the job's ranks compare their GPUs: two on one is a ValueError, tests/test_cuda.py)."""
    assert _start_with(monkeypatch, torchrun_env(1, local_world), gpus) == ([], "gloo")
    if gpus:
        bound, backend = _start_with(monkeypatch, torchrun_env(local_world - 1, local_world), gpus,
                                     backend="nccl")
        assert bound == [(local_world - 1) % gpus] and backend == "cpu:gloo,cuda:nccl"


def test_without_a_launcher_the_job_stays_on_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    # python script.py on a GPU machine: the single-process debug mode stays on gloo
    assert _start_with(monkeypatch, {}, gpus=8) == ([], "gloo")


def test_nccl_asked_for_without_a_gpu_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="backend='gloo'"):
        _start_with(monkeypatch, torchrun_env(0, 2), gpus=0, backend="nccl")


def test_runtime_scenarios_on_two_gloo_ranks(tmp_path: Path) -> None:
    out = torchrun(2, "runtime.py", str(tmp_path), timeout=300)
    for name in SCENARIOS:
        for rank in (0, 1):
            assert f"OK {name} rank {rank}" in out, out[-4000:]


@pytest.mark.parametrize("overrides", [dict(capacity_factor=1.0), dict(capacity_factor=None),
                                       dict(router="expert_choice"), dict(router="soft")])
def test_one_process_names_the_device_of_every_tensor_it_makes(overrides: dict) -> None:
    torch.manual_seed(0)
    moe = ep.MoE(ep.MoEConfig(d_model=8, d_ff=8, num_experts=4, **overrides))
    x = torch.randn(2, 4, 8, requires_grad=True)
    with FactoryWatch() as watch:
        y, aux = moe(x)
        (y.sum() + aux.loss).backward()
    assert watch.undirected == []


def test_the_training_program_keeps_its_tensors_on_the_device(tmp_path: Path) -> None:
    """Two steps (one with an evaluation) of the LM example in one process: every tensor the program
    and the library make names its device, except the host-side data sampling, whose batches are
    moved to the device before use (metric tensors that entered collectives failed under NCCL)."""
    import argparse

    import torch.distributed as dist

    from expert_parallel.apps import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2",
                              "--seq-len", "16", "--d-model", "32", "--n-layers", "1", "--backend", "gloo",
                              "--out", str(tmp_path)])
    run = train.setup(args)
    try:
        with FactoryWatch(host_side=("get_batch", "load_corpus")) as watch:
            records = [train.train_step(run, step) for step in (1, 2)]
        assert watch.undirected == []
        assert "val_loss" in records[1] and len(records[0]["expert_counts"][0]) == args.num_experts
    finally:
        dist.destroy_process_group()
