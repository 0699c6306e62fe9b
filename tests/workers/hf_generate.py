"""Run under torchrun (2 ranks): generate() of expert-parallel models when ranks stop at different steps.

    torchrun --standalone --nproc-per-node 2 tests/workers/hf_generate.py SAVE_DIR

For each family, each rank decodes its own prompt greedily with no extra argument: different
max_new_tokens per rank, different prompt lengths under one max_length, and an EOS that one rank
reaches first. The tokens must equal the unmodified transformers model's on the same prompt and
arguments. The same for a model read by ep.hf.from_pretrained. Prints "OK <family>" per family and
rank, "ALL OK" at the end.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import expert_parallel as ep
from tests.hf_models import tiny_model

TIMEOUT = 20.0  # seconds: a hang would end as an error well inside the test's budget


def prompt(rank: int, length: int) -> torch.Tensor:
    return torch.randint(1, 64, (1, length), generator=torch.Generator().manual_seed(11 + rank))


def same_tokens(model: torch.nn.Module, ref: torch.nn.Module, ids: torch.Tensor, what: str,
                **kwargs: object) -> torch.Tensor:
    kwargs = {"do_sample": False, "pad_token_id": 0, **kwargs}
    got = model.generate(ids, **kwargs)
    want = ref.generate(ids, **kwargs)
    assert torch.equal(got, want), f"{what}: {got.tolist()} != {want.tolist()}"
    return want


def check(model: torch.nn.Module, ref: torch.nn.Module, rank: int, family: str) -> None:
    # 1. each rank its own number of new tokens
    same_tokens(model, ref, prompt(rank, 4), f"{family} max_new_tokens", max_new_tokens=[7, 2][rank],
                eos_token_id=None)
    # 2. prompts of different lengths, one max_length
    same_tokens(model, ref, prompt(rank, [3, 8][rank]), f"{family} max_length", max_length=12,
                eos_token_id=None)
    # 3. an EOS that rank 1 produces at its second step (rank 0 may never see it)
    free = ref.generate(prompt(1, 4), do_sample=False, pad_token_id=0, max_new_tokens=2, eos_token_id=None)
    eos = int(free[0, -1])
    out = same_tokens(model, ref, prompt(rank, 4), f"{family} eos", max_new_tokens=8, eos_token_id=eos)
    if rank == 1:
        assert out.shape[1] <= 4 + 2, f"{family}: rank 1 went past its EOS: {out.tolist()}"


def main() -> int:
    save_dir = Path(sys.argv[1])
    ctx = ep.init_distributed(timeout=TIMEOUT)
    for family in ("mixtral", "qwen3_moe", "deepseek_v3"):
        ref = tiny_model(family).eval()
        model = ep.hf.expert_parallelize(copy.deepcopy(ref), ctx).eval()
        check(model, ref, ctx.rank, family)
        print(f"OK {family}", flush=True)
    if ctx.rank == 0:
        ref.save_pretrained(save_dir)
    dist.barrier()  # the user's own collective on the default group: never paired with the library's
    loaded = ep.hf.from_pretrained(save_dir, ctx).eval()
    check(loaded, ref, ctx.rank, "from_pretrained")
    print("OK from_pretrained", flush=True)
    print("ALL OK", flush=True)
    ep.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
