"""Graph breaks of one MoE layer's forward under torch.compile, per router and exchange.

    python tests/workers/graph_breaks.py                                  # one process
    torchrun --standalone --nproc-per-node 2 tests/workers/graph_breaks.py  # EP 2, both exchanges

``torch._dynamo.explain`` of an ``ep.MoE`` (d_model 16, d_ff 32, 8 experts, top-2) on a [4, 8, 16]
input; prints one JSON line per case on rank 0: {"case": "<exchange>/<router>", "breaks": n}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch._dynamo as dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import expert_parallel as ep

ROUTERS = {"topk_capacity": dict(capacity_factor=1.0), "topk_dropless": dict(capacity_factor=None),
           "expert_choice": dict(router="expert_choice"), "soft": dict(router="soft")}


def main() -> None:
    ctx = ep.init_distributed(backend="gloo")
    exchanges = ["one process"] if ctx.ep_size == 1 else ["flat", "hierarchical"]
    for exchange in exchanges:
        for name, overrides in ROUTERS.items():
            if exchange == "hierarchical" and name == "soft":
                continue  # the soft router's slot mixes have no per-node copies to deduplicate
            torch.manual_seed(0)
            cfg = ep.MoEConfig(d_model=16, d_ff=32, num_experts=8,
                               exchange="hierarchical" if exchange == "hierarchical" else "flat", **overrides)
            moe = ep.MoE(cfg, ep_group=ctx.ep_group, ranks_per_node=1 if exchange == "hierarchical" else None)
            dynamo.reset()
            explained = dynamo.explain(moe)(torch.randn(4, 8, 16, requires_grad=True))
            if ctx.rank == 0:
                print(json.dumps({"case": f"{exchange}/{name}", "breaks": explained.graph_break_count}),
                      flush=True)
    ep.shutdown(ctx)


if __name__ == "__main__":
    main()
