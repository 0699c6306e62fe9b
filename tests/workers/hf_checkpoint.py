"""Run under torchrun: this library's DCP checkpoints of expert-parallel transformers models reshard
across EP sizes, optimizer state and DeepSeek's (and GLM's) trained bias included; gpt-oss's router and
expert biases too.

    torchrun --standalone --nproc-per-node 2 tests/workers/hf_checkpoint.py save DIR --ep-size 2
    torchrun --standalone --nproc-per-node 4 tests/workers/hf_checkpoint.py load DIR --ep-size 4

"save" trains 2 AdamW steps, checkpoints, trains a third and writes the gathered transformers state
after steps 2 and 3 (DIR/reference.pt). "load" restores into its own layout, checks the state bitwise,
trains step 3 and checks it again (Adam moments followed their experts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import expert_parallel as ep
from tests.hf_models import tiny_model

FAMILIES = ("deepseek_v3", "qwen2_moe", "glm4_moe", "gpt_oss")  # gpt-oss: router and expert biases
GLOBAL_BATCH, L = 4, 16


def build(family: str, ctx: ep.DistContext) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = ep.hf.expert_parallelize(tiny_model(family).train(), ctx)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ctx: ep.DistContext, step: int) -> None:
    idx = torch.randint(0, 64, (GLOBAL_BATCH, L + 1), generator=torch.Generator().manual_seed(step))
    local = GLOBAL_BATCH // ctx.world_size
    mine = idx[ctx.rank * local:(ctx.rank + 1) * local]
    model(mine[:, :-1], labels=mine[:, 1:]).loss.backward()
    ep.sync_gradients(model, ctx)
    opt.step()
    opt.zero_grad()
    ep.update_expert_bias(model, ctx)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("save", "load"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--ep-size", type=int, required=True)
    args = parser.parse_args()
    ctx = ep.init_distributed(ep_size=args.ep_size, backend="gloo", timeout=120)
    for family in FAMILIES:
        model, opt = build(family, ctx)
        ckpt = args.dir / family
        if args.mode == "save":
            reference = {}
            for step in (1, 2):
                train_step(model, opt, ctx, step)
            ep.save_checkpoint(ckpt, model, opt, ctx, step=2)
            reference["state"] = ep.hf.hf_state_dict(model)
            train_step(model, opt, ctx, 3)
            reference["continued"] = ep.hf.hf_state_dict(model)
            if ctx.rank == 0:
                torch.save(reference, ckpt / "reference.pt")
        else:
            reference = torch.load(ckpt / "reference.pt")
            meta = ep.load_checkpoint(ep.latest_checkpoint(ckpt, ctx), model, opt, ctx)
            assert meta["step"] == 2, meta
            for key, value in ep.hf.hf_state_dict(model).items():  # bitwise: the saved values
                assert torch.equal(value, reference["state"][key]), f"{family} state: {key}"
            train_step(model, opt, ctx, 3)  # another layout sums gradients in another order
            for key, value in ep.hf.hf_state_dict(model).items():
                where = f"{family} continued: {key}"
                torch.testing.assert_close(value, reference["continued"][key], rtol=1e-4, atol=1e-6,
                                           msg=lambda m, where=where: f"{where}: {m}")
            bias = [v for k, v in reference["state"].items() if k.endswith("e_score_correction_bias")]
            trained = bool(bias) and all(b.abs().sum() > 0 for b in bias)
            assert family not in ("deepseek_v3", "glm4_moe") or trained, family
        if ctx.rank == 0:
            print(f"ok {args.mode} {family}", flush=True)
    if ctx.rank == 0:
        print(f"ALL OK {args.mode} with {ctx.world_size} ranks, ep_size {ctx.ep_size}", flush=True)
    ep.shutdown(ctx)  # ends a launched process at once (docs/reliability.md, "Ending a job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
