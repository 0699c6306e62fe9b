"""Run under torchrun: a checkpoint written in one layout loads in another with identical outputs,
and continued training (Adam moments following their experts) matches.

    torchrun --standalone --nproc-per-node 4 tests/workers/checkpoint_layouts.py save DIR --ep-size 4
    torchrun --standalone --nproc-per-node 2 tests/workers/checkpoint_layouts.py load DIR --ep-size 2

"save" trains 3 steps, checkpoints, writes reference outputs and the single-device state after 2
more steps (DIR/reference.pt). "load" restores into its own layout and checks both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import expert_parallel as ep
from expert_parallel.apps.lm import LanguageModel, LMConfig
from expert_parallel.integrations.checkpoint import full_state_dict, load_checkpoint, save_checkpoint

GLOBAL_BATCH, L = 8, 16


def build(ctx: ep.DistContext) -> tuple[LanguageModel, torch.optim.Optimizer]:
    # DeepSeek-V3-style routing: the trained expert bias and the shared expert must follow too
    moe = ep.MoEConfig(d_model=32, d_ff=32, num_experts=8, top_k=2, capacity_factor=1.0, min_capacity=1,
                       score_func="sigmoid", bias_update_rate=0.01, num_expert_groups=4, num_limited_groups=2,
                       num_shared_experts=1, shared_expert_gate=True)
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=L, moe=moe, moe_every=2),
                          ep_group=ctx.ep_group)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def batch(step: int, ctx: ep.DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 256, (GLOBAL_BATCH, L + 1), generator=g)
    local = GLOBAL_BATCH // ctx.world_size
    sl = slice(ctx.rank * local, (ctx.rank + 1) * local)
    return idx[sl, :-1], idx[sl, 1:]


def train_step(model: LanguageModel, opt: torch.optim.Optimizer, ctx: ep.DistContext, step: int) -> None:
    x, y = batch(step, ctx)
    _, total, _ = model.loss(x, y)
    opt.zero_grad()
    total.backward()
    ep.sync_gradients(model, ctx)
    opt.step()
    ep.update_expert_bias(model, ctx)


def global_logits(model: LanguageModel, ctx: ep.DistContext) -> torch.Tensor:
    x, _ = batch(999, ctx)
    with torch.no_grad():
        logits, _ = model(x)
    parts = [torch.empty_like(logits) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(parts, logits.contiguous())
    return torch.cat(parts)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=("save", "load"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--ep-size", type=int, required=True)
    args = parser.parse_args()
    ctx = ep.init_distributed(ep_size=args.ep_size, backend="gloo")
    model, opt = build(ctx)
    if args.phase == "save":
        for step in range(3):
            train_step(model, opt, ctx, step)
        save_checkpoint(args.dir / "ckpt", model, opt, ctx, step=3, meta={"note": "layout test"})
        ep.export_single_device(model, args.dir / "model.pt", ctx)
        reference = {"logits": global_logits(model, ctx), "state": full_state_dict(model)}
        for step in range(3, 5):
            train_step(model, opt, ctx, step)
        reference["continued"] = full_state_dict(model)
        if ctx.rank == 0:
            torch.save(reference, args.dir / "reference.pt")
    else:
        reference = torch.load(args.dir / "reference.pt")
        meta = load_checkpoint(ep.checkpoint.latest_checkpoint(args.dir / "ckpt", ctx), model, opt, ctx,
                               meta={"note": ""})
        assert meta["step"] == 3 and meta["note"] == "layout test", meta
        for key, value in full_state_dict(model).items():
            torch.testing.assert_close(value, reference["state"][key], rtol=0, atol=0, msg=key)
        trained_bias = [v for k, v in reference["state"].items() if k.endswith("router.expert_bias")]
        assert trained_bias and all(b.abs().sum() > 0 for b in trained_bias), "the bias never trained"
        assert any(k.startswith("blocks.") and ".shared_experts." in k for k in reference["state"])
        torch.testing.assert_close(global_logits(model, ctx), reference["logits"], rtol=1e-5, atol=1e-5)
        for step in range(3, 5):
            train_step(model, opt, ctx, step)
        for key, value in full_state_dict(model).items():
            # atol 1e-4: the attention key bias has a mathematically zero gradient, and Adam turns its
            # float noise (which depends on the layout's summation order) into ~1e-5 updates. Wrong or
            # missing optimizer state would move weights by ~lr per step (3e-3), far above this.
            torch.testing.assert_close(value, reference["continued"][key], rtol=1e-5, atol=1e-4,
                                       msg=lambda m, key=key: f"continued training, {key}: {m}")
        imported, _ = build(ctx)  # the single-device export, imported into this layout
        ep.import_single_device(imported, args.dir / "model.pt")
        torch.testing.assert_close(global_logits(imported, ctx), reference["logits"], rtol=1e-5, atol=1e-5)
    if ctx.rank == 0:
        print(f"OK {args.phase} with {ctx.world_size} ranks, ep_size {ctx.ep_size}", flush=True)
    ep.shutdown(ctx)  # ends a launched process at once (docs/reliability.md, "Ending a job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
