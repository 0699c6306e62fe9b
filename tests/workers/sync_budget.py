"""Host synchronisations of one MoE forward and backward, counted per router and exchange.

    python tests/workers/sync_budget.py                       # one process
    torchrun --standalone --nproc-per-node 2 tests/workers/sync_budget.py --ep-size 2 \
        [--exchange hierarchical]

Counted: reads of tensor data on the host (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool``/``int``/
``float``/``index`` of a tensor), seen by a TorchFunctionMode, and operators whose output shape
depends on the data (``nonzero``, ``unique``, ``masked_select``, ``bincount``, boolean indexing,
``repeat_interleave`` without ``output_size``), seen by a TorchDispatchMode: each stalls a GPU until
the data is known. Prints one JSON line per case on rank 0: {"case", "forward", "backward"} with
the names counted, then "DONE".
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import expert_parallel as ep

READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
SHAPE_FROM_DATA = {"nonzero", "unique", "_unique2", "unique_consecutive", "unique_dim", "masked_select",
                   "bincount"}
CASES = {
    "topk_capacity": dict(capacity_factor=1.25),
    "topk_dropless": dict(capacity_factor=None),
    "noisy_topk_capacity": dict(router="noisy_topk", capacity_factor=1.25),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
    "soft": dict(router="soft"),
    "deepseek_dropless": dict(score_func="sigmoid", bias_update_rate=0.01, num_expert_groups=4,
                              num_limited_groups=2, num_shared_experts=1, capacity_factor=None),
}


class HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


class ShapeFromData(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if (name in SHAPE_FROM_DATA
                or (name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                            for i in args[1] if i is not None))
                or (name == "repeat_interleave" and kwargs.get("output_size") is None
                    and not (len(args) > 3 and args[3] is not None))):
            self.seen.append(name)
        return func(*args, **kwargs)


class Counted:
    """Both counters over a ``with`` block; ``.seen`` lists what they saw."""

    def __enter__(self) -> Counted:
        self.reads, self.shapes = HostReads(), ShapeFromData()
        self.reads.__enter__()
        self.shapes.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shapes.__exit__(*exc)
        self.reads.__exit__(*exc)
        self.seen = self.reads.seen + self.shapes.seen


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ep-size", type=int, default=None)
    parser.add_argument("--exchange", default="flat", choices=("flat", "hierarchical"))
    args = parser.parse_args()
    ctx = ep.init_distributed(ep_size=args.ep_size, timeout=60)
    for name, overrides in CASES.items():
        exchange = "flat" if overrides.get("router") == "soft" else args.exchange
        cfg = ep.MoEConfig(**{**dict(d_model=16, d_ff=32, num_experts=8, top_k=2, exchange=exchange),
                              **overrides})
        torch.manual_seed(0)
        moe = ep.MoE(cfg, ep_group=ctx.ep_group, ranks_per_node=1 if exchange == "hierarchical" else None)
        moe(torch.randn(2, 8, 16))  # the first call checks the replicas (a collective, once)
        x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(ctx.rank), requires_grad=True)
        with Counted() as forward:
            y, aux = moe(x)
        with Counted() as backward:
            (y.square().mean() + aux.loss).backward()
        if ctx.rank == 0:
            print(json.dumps({"case": f"{name}/{exchange}", "forward": forward.seen,
                              "backward": backward.seen}), flush=True)
    if ctx.rank == 0:
        print("DONE", flush=True)
    ep.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
