"""Run as plain python: a save killed (SIGKILL) after its shards are written leaves `latest` on the
previous checkpoint, which still loads; the next save cleans up the partial one.

    python tests/workers/killed_save.py DIR first     # saves step 2, then dies inside the step-4 save
    python tests/workers/killed_save.py DIR second    # checks and saves step 4 properly
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

import expert_parallel as ep
from expert_parallel.apps.lm import LanguageModel, LMConfig
from expert_parallel.integrations.checkpoint import full_state_dict


def build() -> tuple[LanguageModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    moe = ep.MoEConfig(d_model=16, d_ff=16, num_experts=4, capacity_factor=None)
    model = LanguageModel(LMConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=8, moe=moe))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model: LanguageModel, opt: torch.optim.Optimizer) -> None:
    idx = torch.randint(0, 256, (2, 9))
    model.loss(idx[:, :-1], idx[:, 1:])[1].backward()
    opt.step()
    opt.zero_grad()


def main() -> int:
    directory, phase = Path(sys.argv[1]), sys.argv[2]
    ctx = ep.init_distributed(backend="gloo")
    model, opt = build()
    if phase == "first":
        step(model, opt)
        ep.save_checkpoint(directory, model, opt, ctx, step=2)
        torch.save(full_state_dict(model), directory / "at_step2.pt")
        step(model, opt)
        original = dcp_fs.FileSystemWriter.write_data

        def write_then_die(self, plan, planner):  # the shards are on disk, the save is not done
            result = original(self, plan, planner)
            result.wait()
            os.kill(os.getpid(), signal.SIGKILL)

        dcp_fs.FileSystemWriter.write_data = write_then_die
        ep.save_checkpoint(directory, model, opt, ctx, step=4)
        raise AssertionError("the save was not killed")
    latest = ep.latest_checkpoint(directory)
    assert latest is not None and latest.name == "step_00000002", latest
    assert (directory / "step_00000004.tmp").exists(), sorted(p.name for p in directory.iterdir())
    assert not (directory / "step_00000004").exists()
    meta = ep.load_checkpoint(latest, model, opt, ctx)
    assert meta["step"] == 2
    for key, value in torch.load(directory / "at_step2.pt").items():
        assert torch.equal(full_state_dict(model)[key], value), key
    ep.save_checkpoint(directory, model, opt, ctx, step=4)
    assert ep.latest_checkpoint(directory).name == "step_00000004"
    assert not (directory / "step_00000004.tmp").exists()
    print("OK killed save", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
