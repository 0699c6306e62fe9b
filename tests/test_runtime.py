"""Runtime promises for real jobs: the backend rule, one health group per set of ranks, resuming from
rank 0's checkpoint, verified replicas, no gradient for unused parameters, device discipline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import expert_parallel as ep
from expert_parallel.comm.distributed import LaunchEnv, default_backend, process_group_backend
from tests.procs import torchrun
from tests.workers.runtime import SCENARIOS, FactoryWatch


@pytest.mark.parametrize(("launcher", "local_world", "gpus", "expected"), [
    ("none", 1, 8, "gloo"),  # python script.py on a GPU box: the debug mode stays on gloo
    ("none", 1, 0, "gloo"),
    ("torchrun", 2, 2, "nccl"),
    ("torchrun", 4, 2, "gloo"),  # fewer GPUs than local ranks
    ("mpi", 8, 8, "nccl"),
    ("deepspeed", 2, 0, "gloo"),
])
def test_default_backend(launcher: str, local_world: int, gpus: int, expected: str) -> None:
    launch = LaunchEnv(launcher, 0, local_world, 0, local_world)
    assert default_backend(launch, cuda_devices=gpus) == expected


def test_nccl_groups_also_carry_gloo_for_cpu_tensors() -> None:
    assert process_group_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("gloo") == "gloo"


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
