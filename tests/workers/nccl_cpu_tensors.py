"""Run under torchrun on GPUs: the job's NCCL groups carry CPU tensors too (gloo beside NCCL).

    torchrun --standalone --nproc-per-node 2 tests/workers/nccl_cpu_tensors.py

Each rank all-reduces a CPU tensor and a CUDA tensor holding rank + 1 over the default group and
over its expert-parallel group, and checks the sums; prints "OK cpu and cuda" per rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import expert_parallel as ep


def main() -> None:
    ctx = ep.init_distributed()
    assert ctx.backend == "nccl" and ctx.device.type == "cuda", (ctx.backend, ctx.device)
    for group in (None, ctx.ep_group):
        ranks = range(ctx.world_size) if group is None else dist.get_process_group_ranks(group)
        expected = float(sum(r + 1 for r in ranks))
        for device in ("cpu", ctx.device):
            t = torch.full((3,), float(ctx.rank + 1), device=device)
            dist.all_reduce(t, group=group)
            assert t.device.type == torch.device(device).type
            assert torch.equal(t.cpu(), torch.full((3,), expected)), (device, t)
    print(f"OK cpu and cuda rank {ctx.rank}", flush=True)
    ep.shutdown(ctx)


if __name__ == "__main__":
    main()
