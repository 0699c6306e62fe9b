"""Run under the DeepSpeed launcher: our MoE model trained by DeepSpeed's engine (ZeRO 1 and 2)
equals the plain path (sync_gradients + the same optimizer), step for step.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 4 tests/workers/deepspeed_engine.py --ep-size 2
"""

from __future__ import annotations

import argparse
import sys

import deepspeed
import torch
from ep_equivalence import D, L, TwoLayer

import expert_parallel as ep

STEPS = 10


def batches(world: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, L, D, generator=g), torch.randn(2, L, D, generator=g)


def loss_of(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out, aux_loss = model(x)
    return ((out - target) ** 2).mean() + aux_loss


def run_stage(ctx: ep.DistContext, stage: int) -> None:
    torch.manual_seed(0)
    model = TwoLayer(ctx.ep_group)
    torch.manual_seed(0)
    plain = TwoLayer(ctx.ep_group)
    initial = model.moe1.experts.w_in.detach().clone()
    groups = ep.prepare_for_deepspeed(model, ctx)
    assert any(group.get("moe") for group in groups), groups
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2),
                                      config=config)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for step in range(STEPS):
        x, target = batches(ctx.world_size, ctx.rank, step)
        engine.backward(loss_of(engine, x, target))
        engine.step()
        loss_of(plain, x, target).backward()
        ep.sync_gradients(plain, ctx)
        plain_opt.step()
        plain_opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"ZeRO {stage}, {name}: {m}")
    assert not torch.equal(model.moe1.experts.w_in.detach(), initial), "the engine did not train"
    if ctx.rank == 0:
        print(f"ok ZeRO stage {stage}: {STEPS} DeepSpeed steps == {STEPS} plain steps", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # the DeepSpeed launcher passes it
    parser.add_argument("--ep-size", type=int, default=2)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    ctx = ep.init_distributed(ep_size=args.ep_size)  # adopts DeepSpeed's process group
    assert ctx.launcher == "deepspeed", ctx.launcher
    for stage in (1, 2):
        run_stage(ctx, stage)
    if ctx.rank == 0:
        print("ALL OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
