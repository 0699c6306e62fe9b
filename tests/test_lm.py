"""The example language model: causal for every router, refuses unsafe grouping, fair comparisons."""

from __future__ import annotations

import pytest
import torch

import expert_parallel as ep
from expert_parallel.apps.lm import LanguageModel, LMConfig

D = 32


def lm(router: str, **moe_overrides: object) -> LanguageModel:
    moe = ep.MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=2, router=router,
                       **{"capacity_factor": None if router in ("topk", "noisy_topk") else 1.0,
                          **moe_overrides})
    torch.manual_seed(0)
    return LanguageModel(LMConfig(d_model=D, n_layers=2, n_heads=2, max_seq_len=16, d_ff=64, moe=moe))


@pytest.mark.parametrize("router", ["topk", "expert_choice", "soft"])
def test_model_is_causal(router: str) -> None:
    """Changing tokens from position t on never changes the logits before t, up to fp32 rounding:
    later tokens change how many rows each expert's GEMM has, and a CPU GEMM's row results depend on
    its row count (1–3 rows take another kernel than 40), so bitwise equality is not a property of
    dropless routing. A leak of future tokens moves logits by orders of magnitude more."""
    model = lm(router).eval()
    idx = torch.randint(0, 256, (3, 12))
    logits, _ = model(idx)
    for t in (1, 5, 11):
        changed = idx.clone()
        changed[:, t:] = torch.randint(0, 256, (3, 12 - t))
        torch.testing.assert_close(model(changed)[0][:, :t], logits[:, :t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_token_mixing_router_with_sequence_groups_is_refused(router: str) -> None:
    moe = ep.MoEConfig(d_model=D, d_ff=32, num_experts=4, router=router)
    with pytest.raises(ValueError, match="leaks future tokens"):
        LMConfig(d_model=D, n_heads=2, moe=moe, position_groups=False)
    assert LMConfig(d_model=D, n_heads=2, moe=moe).per_position


def test_lm_config_validation() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        LMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match=r"moe\.d_model"):
        LMConfig(d_model=D, n_heads=2, moe=ep.MoEConfig(d_model=16, d_ff=8, num_experts=2))
    with pytest.raises(ValueError, match=r"LMConfig\.n_layers"):
        LMConfig(n_layers=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        lm("topk")(torch.zeros(1, 17, dtype=torch.long))


def test_moe_every_and_aux_losses_reach_the_loss() -> None:
    moe = ep.MoEConfig(d_model=D, d_ff=32, num_experts=4, capacity_factor=None)
    model = LanguageModel(LMConfig(d_model=D, n_layers=4, n_heads=2, max_seq_len=8, moe=moe, moe_every=2))
    assert [type(b.ffn).__name__ for b in model.blocks] == ["FeedForward", "MoE", "FeedForward", "MoE"]
    idx = torch.randint(0, 256, (2, 8))
    task, total, auxes = model.loss(idx, idx)
    assert len(auxes) == 2
    torch.testing.assert_close(total, task + auxes[0].loss + auxes[1].loss)


def test_equal_active_parameters_for_the_comparison() -> None:
    """train.model_config sizes experts so that dense, top-1, top-2 and EC use the same FFN width."""
    import argparse

    from expert_parallel.apps import compare, train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    base = parser.parse_args([])
    counts = {}
    for name, overrides in compare.VARIANTS.items():
        model = LanguageModel(train.model_config(argparse.Namespace(**{**vars(base), **overrides})))
        counts[name] = model.active_parameters_per_token()
    routers = base.n_layers * base.num_experts * base.d_model  # the MoE variants' router weights
    assert counts["moe_top1"] == counts["moe_top2"] == counts["moe_expert_choice"]
    assert counts["moe_top1"] == counts["dense"] + routers
