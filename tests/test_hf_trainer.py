"""Hugging Face Trainer and accelerate with expert-parallel models, against the unmodified model
under the same loop (tests/workers/hf_trainer.py, real gloo groups at world 2 and 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.procs import torchrun

CASES = [("trainer", 2), ("trainer", 4), ("accelerate", 2), ("accelerate", 4), ("resume", 2), ("resume", 4),
         ("bias", 2), ("best", 2), ("no-callback", 2)]


@pytest.mark.parametrize("check, world", CASES, ids=[f"{c}-w{w}" for c, w in CASES])
def test_hf_loops_train_expert_parallel_models_right(check: str, world: int, tmp_path: Path) -> None:
    """trainer: Trainer + ExpertParallelCallback equals Trainer's DDP on the unmodified model (SGD,
    accumulation, clipping) and trainer.save_model loads in plain transformers; accelerate: an
    unchanged accelerate loop equals the unmodified model's; resume: a Trainer checkpoint resumes
    exactly (experts and optimizer state per rank); bias: DeepSeek-V3's bias trained once per step
    from the job's counts (against EP 1); best: epoch saves and load_best_model_at_end give the best
    checkpoint's experts; no-callback: a user's own DDP trains right, and
    trainer.save_model without the callback fails at once naming ep.hf.save_pretrained.
    World 4 is EP 2 x DP 2."""
    out = torchrun(world, "hf_trainer.py", check, str(tmp_path), "--ep-size", "2", timeout=400)
    assert f"OK {check}" in out, out[-3000:]
    if check == "no-callback":
        assert "rank 0: save refused at once" in out, out[-3000:]


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
