"""Hugging Face Trainer and accelerate with expert-parallel models, against the unmodified model
under the same loop (tests/workers/hf_trainer.py, real gloo groups at world 2 and 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.procs import torchrun

CASES = [("trainer", 2), ("trainer", 4), ("accelerate", 2), ("accelerate", 4), ("resume", 4), ("families", 2),
         ("raises", 2), ("bias", 2), ("no-callback", 2)]


@pytest.mark.parametrize("check, world", CASES, ids=[f"{c}-w{w}" for c, w in CASES])
def test_hf_loops_train_expert_parallel_models_right(check: str, world: int, tmp_path: Path) -> None:
    """trainer: Trainer + ExpertParallelCallback equals Trainer's DDP on the unmodified model (SGD,
    accumulation, clipping) and trainer.save_model loads in plain transformers; accelerate: an
    unchanged accelerate loop equals the unmodified model's; resume (EP 2 x DP 2): a Trainer
    checkpoint resumes exactly into a model whose every tensor was spoilt (experts and optimizer
    state per rank); families: resume and load_best_model_at_end restore every tensor, routers
    included, for every supported family (against the uninterrupted run, and the best checkpoint as
    plain transformers loads it), and a resume_from checkpoint differing in one replicated tensor is
    refused; raises: a run raising mid-step leaves args.max_grad_norm as the user set it; bias:
    DeepSeek-V3's bias trained once per step from the job's counts (against EP 1); no-callback: a
    user's own DDP trains right, and trainer.save_model without the callback fails at once naming
    ep.hf.save_pretrained. World 4 is EP 2 x DP 2."""
    out = torchrun(world, "hf_trainer.py", check, str(tmp_path), "--ep-size", "2", timeout=400)
    assert f"OK {check}" in out, out[-3000:]
    if check == "no-callback":
        assert "rank 0: save refused at once" in out, out[-3000:]
    if check == "families":
        from tests.hf_models import FAMILIES
        assert all(f"{family}: resume and best OK" in out for family in FAMILIES), out[-3000:]


class _Experts(torch.nn.Module):
    """A module with an expert tensor (``down_proj``) and another (``weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.down_proj = torch.nn.Parameter(torch.zeros(2, 3))
        self.weight = torch.nn.Parameter(torch.zeros(3))


def _on_meta() -> tuple[bool, bool]:
    """Where a module built now puts its expert tensor and its other one: (meta, meta)."""
    m = _Experts()
    return m.down_proj.is_meta, m.weight.is_meta


def test_experts_on_meta_is_undone_on_every_exit() -> None:
    """ep.hf.from_pretrained's meta-device construction of the experts: active in its region for
    this thread's expert tensors only, undone when the region raises, when two regions end in the
    other order than they began, and for modules another thread builds meanwhile."""
    import threading

    from expert_parallel.integrations.hf import _experts_on_meta
    register = torch.nn.Module.register_parameter
    with _experts_on_meta():
        assert _on_meta() == (True, False)  # the region works: experts only
        other: list[tuple[bool, bool]] = []
        thread = threading.Thread(target=lambda: other.append(_on_meta()))
        thread.start()
        thread.join()
        assert other == [(False, False)], other  # another thread's modules are left alone
    with pytest.raises(KeyError), _experts_on_meta():
        raise KeyError("raised inside the region")
    assert _on_meta() == (False, False)
    first, second = _experts_on_meta(), _experts_on_meta()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first to begin ends first
    second.__exit__(None, None, None)
    assert _on_meta() == (False, False)
    assert torch.nn.Module.register_parameter is register


def test_finetune_hf_trainer_saves_a_model_plain_transformers_loads(tmp_path: Path) -> None:
    """finetune-hf --trainer at EP 2: Trainer's loss falls, and OUT/model (trainer.save_model)
    loads in plain transformers with the trained model's routing (DeepSeek-V3's bias moved)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from expert_parallel.apps.finetune_hf import tiny_config
    from tests.procs import ROOT
    torchrun(2, ROOT / "examples" / "finetune_hf.py", "--trainer", "--family", "deepseek_v3", "--steps", "12",
             "--log-every", "4", "--grad-accum", "2", "--out", str(tmp_path), timeout=400)
    summary = json.loads((tmp_path / "summary.json").read_text())
    losses = [loss for _, loss in summary["losses"]]
    assert summary["trainer"] and len(losses) == 3 and losses[-1] < losses[0], summary
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    assert type(plain).__name__ == "DeepseekV3ForCausalLM"
    fresh = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3"))
    bias = [b for n, b in plain.named_buffers() if n.endswith("e_score_correction_bias")]
    assert bias and any(not torch.equal(b, torch.zeros_like(b)) for b in bias)
    assert set(plain.state_dict()) == set(fresh.state_dict())
