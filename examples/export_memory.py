"""Peak host memory per rank of ``ep.hf.save_pretrained`` (streamed), beside gathering everything.

    torchrun --nproc-per-node 4 examples/export_memory.py --experts 64 --layers 8
    (or python examples/export_memory.py …: one process)

A Qwen3-MoE causal LM from its config class (fp32, random weights), made expert-parallel over all
ranks, is saved twice: ``--method stream`` (``ep.hf.save_pretrained``: each block's experts gathered
to rank 0 and written before the next) and ``--method gather`` (every rank gathers the whole model
with ``ep.hf.hf_state_dict``, then rank 0 writes it with transformers' ``save_pretrained``, as a user
would without the streamed export). Each rank resets its peak resident set size
(``/proc/self/clear_refs``) before a save and reads it after: the increase is what the save needed.
Rank 0 prints one line per method and rank, in MiB and in units of one layer's experts; the stream
save is checked to load in plain transformers with every tensor equal.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import expert_parallel as ep

MiB = 2**20


def rss_kib(field: str) -> int:
    """VmRSS / VmHWM (the peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Resets the peak resident set size to the current one (Linux ≥ 4.0); returns it in bytes."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kib("VmRSS") * 1024


def build(args: argparse.Namespace, ctx: ep.DistContext) -> torch.nn.Module:
    import transformers as tf

    config = tf.Qwen3MoeConfig(vocab_size=256, hidden_size=args.d_model, intermediate_size=args.d_model,
                               moe_intermediate_size=args.d_ff, num_hidden_layers=args.layers,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=args.d_model // 4,
                               num_experts=args.experts, num_experts_per_tok=2, decoder_sparse_step=1,
                               mlp_only_layers=[], max_position_embeddings=64)
    torch.manual_seed(0)
    return ep.hf.expert_parallelize(tf.AutoModelForCausalLM.from_config(config).eval(), ctx)


def save(method: str, model: torch.nn.Module, out: Path, ctx: ep.DistContext) -> None:
    if method == "stream":
        ep.hf.save_pretrained(model, out, ctx)
        return
    state = ep.hf.hf_state_dict(model)  # every rank gathers every expert
    save_fn = type(model).save_pretrained  # transformers' own, with the gathered state
    save_fn(model, str(out), state_dict=state, is_main_process=ctx.rank == 0)
    del state
    dist.barrier()


def check_loads(model: torch.nn.Module, out: Path) -> None:
    """Plain transformers loads the stream save with every tensor equal to the gathered model's."""
    import transformers as tf

    expected = ep.hf.hf_state_dict(model, to_rank=0)  # a collective; rank 0 gets it
    if dist.get_rank() != 0:
        return
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    if sorted(loaded) != sorted(expected):
        raise SystemExit(f"keys differ: {sorted(set(loaded) ^ set(expected))[:5]}")
    bad = [k for k in expected if not torch.equal(loaded[k], expected[k])]
    if bad:
        raise SystemExit(f"tensors differ after the round trip: {bad[:5]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--method", choices=["stream", "gather", "both"], default="both")
    parser.add_argument("--json", type=Path, default=None, help="also write the lines here (rank 0)")
    args = parser.parse_args()
    ctx = ep.init_distributed()
    if args.experts % ctx.world_size:
        if ctx.rank == 0:
            print(f"export_memory.py: error: --experts {args.experts} is not divisible by the "
                  f"{ctx.world_size} ranks", file=sys.stderr)
        ep.shutdown(ctx, exit_code=2)
    model = build(args, ctx)
    layer = args.experts * 3 * args.d_model * args.d_ff * 4  # one block's experts, fp32 bytes
    own = layer * args.layers // ctx.world_size
    rows = []
    with tempfile.TemporaryDirectory() as mine:
        shared = [mine]
        dist.broadcast_object_list(shared, src=0)  # rank 0's directory (one host)
        tmp = shared[0]
        for method in (["stream", "gather"] if args.method == "both" else [args.method]):
            out = Path(tmp) / method
            before = reset_peak()
            save(method, model, out, ctx)
            extra = rss_kib("VmHWM") * 1024 - before
            rows.append(dict(method=method, rank=ctx.rank, ranks=ctx.world_size, extra_bytes=extra,
                             own_expert_bytes=own, layer_bytes=layer, model_expert_bytes=layer * args.layers))
            if method == "stream":
                check_loads(model, out)
            dist.barrier()
    gathered: list[list[dict]] = [[] for _ in range(ctx.world_size)]
    dist.all_gather_object(gathered, rows)
    if ctx.rank == 0:
        lines = sorted((r for per in gathered for r in per), key=lambda r: (r["method"], r["rank"]))
        print(f"R={ctx.world_size} E={args.experts} layers={args.layers}: one layer's experts "
              f"{layer / MiB:.1f} MiB, all {layer * args.layers / MiB:.1f} MiB, own {own / MiB:.1f} MiB")
        for r in lines:
            print(f"{r['method']:6s} rank {r['rank']}: peak +{r['extra_bytes'] / MiB:7.1f} MiB = "
                  f"{r['extra_bytes'] / layer:5.2f} layers = {r['extra_bytes'] / own:5.2f}x own experts")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(lines, indent=1))
    ep.shutdown(ctx)


if __name__ == "__main__":
    main()
