"""Run under torchrun: transformers MoE models made expert-parallel equal the unmodified model.

    torchrun --standalone --nproc-per-node 2 tests/workers/hf_equivalence.py --ep-size 2

For every family: logits and HF's aux_loss on this rank's slice equal the unmodified model's
(fp32, relative 1e-5); one SGD step with ep.sync_gradients on the global batch equals the unmodified
model's step on the whole batch (every parameter, experts compared as this rank's slice); for
DeepSeek-V3 and GLM-4.5, update_expert_bias moves the model's own e_score_correction_bias by the sign
rule on the global batch's selections; with --save, save_pretrained -> plain from_pretrained and
ep.hf.from_pretrained (this rank's experts only). Prints "ALL OK <n>" on rank 0.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import expert_parallel as ep
from expert_parallel.comm.distributed import full_tensor
from tests.hf_models import FAMILIES, tiny_model

GLOBAL_BATCH, L = 4, 16
BIASED = ("deepseek_v3", "glm4_moe")  # e_score_correction_bias, trained by ep.update_expert_bias


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def expert_view(ref: torch.nn.Module, name: str, first: int, count: int) -> torch.Tensor:
    """The reference's expert tensor behind our parameter ``name`` (…moe.experts.w_gate/w_in/w_out,
    b_gate/b_in/b_out), read off the family's modeling code."""
    prefix = name.split(".moe.experts.")[0]
    kind = name.rsplit(".", 1)[1]
    experts = ref.get_submodule(f"{prefix}.experts")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if hasattr(experts, "gate_up_proj_bias"):  # gpt-oss: x @ W + b, gate/up columns interleaved
        bias = experts.gate_up_proj_bias
        views = {"w_gate": gate_up[..., ::2], "w_in": gate_up[..., 1::2], "w_out": down,
                 "b_gate": bias[:, ::2], "b_in": bias[:, 1::2], "b_out": experts.down_proj_bias}
    else:  # linear(x, W) = x @ W.T; gate rows, then up rows
        F = gate_up.shape[1] // 2
        views = {"w_gate": gate_up[:, :F].transpose(1, 2), "w_in": gate_up[:, F:].transpose(1, 2),
                 "w_out": down.transpose(1, 2)}
    return views[kind][first:first + count]


def run_family(family: str, ctx: ep.DistContext, save_dir: Path | None, shard: bool = False) -> None:
    ref = tiny_model(family)
    model = ep.hf.expert_parallelize(copy.deepcopy(ref), ctx)
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 64, (GLOBAL_BATCH, L + 1), generator=g)
    local = GLOBAL_BATCH // ctx.world_size
    mine = idx[ctx.rank * local:(ctx.rank + 1) * local]
    # 1. logits and HF's aux loss on this rank's slice
    with torch.no_grad():
        out = model(mine[:, :-1], output_router_logits=True)
        want = ref(mine[:, :-1], output_router_logits=True)
    close(out.logits, want.logits, f"{family}: logits")
    if getattr(want, "aux_loss", None) is not None:
        close(out.aux_loss, want.aux_loss, f"{family}: aux_loss")
    # 2. one training step on the global batch
    model.train()
    ref.train()
    counts = selections(ref, idx[:, :-1]) if family in BIASED else None
    if shard:  # FSDP2: every parameter sharded, the experts also over their dp replicas
        model = ep.fully_shard(model, ctx)
    loss = model(mine[:, :-1], labels=mine[:, 1:]).loss
    loss.backward()
    if not shard:
        ep.sync_gradients(model, ctx)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    ref(idx[:, :-1], labels=idx[:, 1:]).loss.backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for name, p in model.named_parameters():
        value = full_tensor(p)  # fully_shard's shards gathered (this rank's experts)
        if ".moe.experts." in name:
            moe = model.get_submodule(name.split(".moe.experts.")[0] + ".moe")
            first, count = moe.experts.first, moe.experts.num_local
            close(value, expert_view(ref, name, first, count), f"{family}: {name} after a step")
        elif ".moe.router." not in name:  # the router weight is the gate's (same tensor)
            close(value, ref.get_parameter(name), f"{family}: {name} after a step")
    if counts is not None:
        check_bias_update(model, ref, counts, ctx, family)
    if save_dir is not None:
        check_save_pretrained(model, ctx, save_dir / family, idx[:, :-1])


def check_save_pretrained(model: torch.nn.Module, ctx: ep.DistContext, path: Path, idx: torch.Tensor) -> None:
    """The trained expert-parallel model, saved, loads in plain transformers with the same weights
    (every expert, the trained bias) and the same logits on every rank's tokens."""
    import transformers as tf
    ep.hf.save_pretrained(model, path, ctx)
    expected = ep.hf.hf_state_dict(model)
    plain = tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    loaded = plain.state_dict()
    assert set(loaded) == set(expected), sorted(set(loaded) ^ set(expected))
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), f"{path.name}: {key} after save_pretrained"
    local = idx.shape[0] // ctx.world_size
    mine = idx[ctx.rank * local:(ctx.rank + 1) * local]
    model.eval()
    with torch.no_grad():
        close(plain(mine).logits, model(mine).logits, f"{path.name}: logits after save_pretrained")
    check_from_pretrained(model, ctx, path, mine)


class RecordingSafeOpen:
    """safetensors.safe_open that records which tensors are read: (key, None) for a whole tensor,
    (key, index) for a slice."""

    def __init__(self, original, read: list) -> None:  # type: ignore[no-untyped-def]
        self.original, self.read = original, read

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        handle = self.original(*args, **kwargs)
        read = self.read

        class Handle:
            def __enter__(self):  # type: ignore[no-untyped-def]
                self.inner = handle.__enter__()
                return self

            def __exit__(self, *exc):  # type: ignore[no-untyped-def]
                return handle.__exit__(*exc)

            def keys(self):  # type: ignore[no-untyped-def]
                return self.inner.keys()

            def get_tensor(self, key):  # type: ignore[no-untyped-def]
                read.append((key, None))
                return self.inner.get_tensor(key)

            def get_slice(self, key):  # type: ignore[no-untyped-def]
                inner = self.inner.get_slice(key)

                class Slice:
                    def __getitem__(self, index):  # type: ignore[no-untyped-def]
                        read.append((key, index))
                        return inner[index]
                return Slice()
        return Handle()


def check_from_pretrained(model: torch.nn.Module, ctx: ep.DistContext, path: Path,
                          mine: torch.Tensor) -> None:
    """Loading the saved directory straight into this layout: each rank reads only its own experts'
    tensors (per-expert keys, or its rows of fused ones: gpt-oss), and the model equals the one that
    was saved."""
    import re

    import safetensors
    read: list[tuple[str, object]] = []
    original = safetensors.safe_open
    safetensors.safe_open = RecordingSafeOpen(original, read)
    try:
        loaded = ep.hf.from_pretrained(path, ctx, attn_implementation="eager").eval()
    finally:
        safetensors.safe_open = original
    experts_read = {int(m.group(1)) for key, _ in read if (m := re.search(r"\.experts\.(\d+)\.", key))}
    fused = [(key, rows) for key, rows in read if re.search(r"\.experts\.(gate_up|down)_proj", key)]
    E = 8
    count = E // ctx.ep_size
    own = slice(ctx.ep_rank * count, (ctx.ep_rank + 1) * count)
    if fused:  # the fused tensors are saved as they are (gpt-oss): this rank's rows of each, only
        assert not experts_read and len(fused) == 4 * 2 and all(rows == own for _, rows in fused), fused
    else:
        assert experts_read == set(range(own.start, own.stop)), experts_read
    with torch.no_grad():
        close(loaded(mine).logits, model(mine).logits, f"{path.name}: logits after from_pretrained")


def selections(ref: torch.nn.Module, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per MoE gate of the reference: selected assignments per expert on ``idx`` (whole batch).

    The gate returns (logits, weights, indices) in current transformers; in 5.5 it returns the logits
    and its block's route_tokens_to_experts picks the experts.
    """
    counts: dict[str, torch.Tensor] = {}

    def record(name: str, block: torch.nn.Module, out: object) -> None:
        chosen = out[2] if isinstance(out, tuple) else block.route_tokens_to_experts(out)[0]
        counts[name] = torch.bincount(chosen.reshape(-1), minlength=block.experts.gate_up_proj.shape[0])

    blocks = [n for n, m in ref.named_modules() if n.endswith(".mlp") and hasattr(m, "experts")]
    hooks = [ref.get_submodule(n).gate.register_forward_hook(
                 lambda mod, args, out, n=n: record(n + ".gate", ref.get_submodule(n), out)) for n in blocks]
    with torch.no_grad():
        ref(idx)
    for h in hooks:
        h.remove()
    return counts


def check_bias_update(model: torch.nn.Module, ref: torch.nn.Module, counts: dict[str, torch.Tensor],
                      ctx: ep.DistContext, family: str) -> None:
    before = {n: ref.get_buffer(f"{n}.e_score_correction_bias").clone() for n in counts}
    ep.update_expert_bias(model, ctx)
    for n, c in counts.items():
        c = c.double()
        expected = before[n] + (1e-3 * torch.sign(c.mean() - c)).float()
        got = model.get_buffer(f"{n}.e_score_correction_bias")
        assert torch.equal(got, expected), f"{family}: {n} bias {got} != {expected}"


def check_bad_expert_count(ctx: ep.DistContext) -> None:
    """Experts not divisible by the expert-parallel size: a ValueError naming both."""
    import transformers as tf

    from tests.hf_models import COMMON
    config = tf.MixtralConfig(**COMMON, intermediate_size=48, num_key_value_heads=2,
                              num_local_experts=ctx.ep_size + 1, num_experts_per_tok=2)
    model = tf.AutoModelForCausalLM.from_config(config)
    try:
        ep.hf.expert_parallelize(model, ctx)
    except ValueError as err:
        assert f"{ctx.ep_size + 1} experts are not divisible" in str(err), err
        return
    raise AssertionError("an expert count not divisible by ep_size was accepted")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ep-size", type=int, required=True)
    parser.add_argument("--save", type=Path, default=None, help="also check save_pretrained into DIR")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--fully-shard", action="store_true", help="train the step under ep.fully_shard")
    args = parser.parse_args()
    ctx = ep.init_distributed(ep_size=args.ep_size, backend="gloo", timeout=120)
    for family in args.families:
        run_family(family, ctx, args.save, args.fully_shard)
        if ctx.rank == 0:
            print(f"ok {family}", flush=True)
    if ctx.ep_size > 1:
        check_bad_expert_count(ctx)
    if ctx.rank == 0:
        print(f"ALL OK {len(args.families)} families with {ctx.world_size} ranks, ep_size {ctx.ep_size}",
              flush=True)
    ep.shutdown(ctx)  # ends a launched process at once (docs/reliability.md, "Ending a job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
