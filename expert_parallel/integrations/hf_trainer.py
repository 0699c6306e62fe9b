"""Hugging Face Trainer with expert-parallel models: ``ep.hf.ExpertParallelCallback``.

Training itself needs nothing from here: ``ep.hf.expert_parallelize`` prepares the model for any
DistributedDataParallel wrapper (``ep.prepare_ddp``), Trainer's among them. Four things in Trainer's
loop are per rank and so wrong for experts that differ between ranks; the callback does them for
the whole job:

- gradient clipping: Trainer clips with each rank's own gradient norm (its experts differ), so the
  ranks would scale their replicated gradients differently and drift apart. The callback takes
  ``max_grad_norm`` over (Trainer's clipping is switched off for the run) and clips with the job's
  norm (``ep.clip_grad_norm_``) just before the optimizer step;
- the aux-loss-free bias (DeepSeek-V3, GLM-4.5): ``ep.update_expert_bias`` after each optimizer
  step, from the job's counts summed over the micro-batches;
- saving: Trainer saves on rank 0 alone, which holds only its own experts. When a save is due (a
  checkpoint step, the end of training) every rank gathers the model into transformers' layout and
  rank 0 keeps it; ``model.save_pretrained`` on rank 0 (which ``trainer.save_model`` calls) writes
  that. Every rank also writes its own optimizer state into the checkpoint;
- resuming: transformers loads the checkpoint's replicated tensors and rank 0's optimizer state on
  every rank; the callback then loads this rank's experts from the checkpoint's safetensors and its
  own optimizer state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..comm.distributed import DistContext
from ..comm.grads import clip_grad_norm_, update_expert_bias
from .hf import ExpertParallelBlock, keep_for_save, load_local_experts

OPTIMIZER_FILE = "expert_parallel_optimizer_rank{rank}.pt"


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate's AcceleratedOptimizer holds the torch optimizer in ``.optimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


class ExpertParallelCallback(TrainerCallback):
    """Makes ``transformers.Trainer`` right for a model made expert-parallel by ``ep.hf``.

    ``Trainer(model=model, ..., callbacks=[ep.hf.ExpertParallelCallback(ctx)])`` on every rank.
    See the module's docstring for what it does; docs/hf.md for the whole recipe.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.max_grad_norm = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or not any(isinstance(m, ExpertParallelBlock) for m in model.modules()):
            raise ValueError("ExpertParallelCallback: the model has no expert-parallel block; make it "
                             "expert-parallel first (ep.hf.expert_parallelize or ep.hf.from_pretrained)")
        self.max_grad_norm = float(args.max_grad_norm or 0.0)
        args.max_grad_norm = 0.0  # restored at the end of training: we clip with the job's norm
        if state.global_step > 0:
            self._resume(Path(args.output_dir) / f"checkpoint-{state.global_step}", model, optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        args.max_grad_norm = self.max_grad_norm
        assert model is not None
        keep_for_save(model, self.ctx)  # NOTE: collective: for trainer.save_model after train()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                              **kwargs: Any) -> None:
        if self.max_grad_norm > 0:
            assert model is not None
            clip_grad_norm_(model, self.max_grad_norm, self.ctx)  # NOTE: collective

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                          **kwargs: Any) -> None:
        assert model is not None
        update_expert_bias(model, self.ctx)  # NOTE: collective (nothing without a biased router)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        if control.should_save:  # Trainer saves a checkpoint right after this, on rank 0
            assert model is not None
            keep_for_save(model, self.ctx)  # NOTE: collective

    def on_save(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        mine = folder / OPTIMIZER_FILE.format(rank=self.ctx.rank)
        torch.save(_unwrap_optimizer(optimizer).state_dict(), mine)

    def _resume(self, folder: Path, model: nn.Module, optimizer: Any) -> None:
        """This rank's experts and optimizer state from a checkpoint Trainer is resuming from."""
        mine = folder / OPTIMIZER_FILE.format(rank=self.ctx.rank)
        if not mine.is_file():
            raise ValueError(f"ExpertParallelCallback: resuming at step {folder.name}, but {mine} is "
                             f"missing: expert-parallel runs resume from checkpoints in "
                             f"args.output_dir written with this callback, by the same number of ranks")
        load_local_experts(model, folder)
        if optimizer is not None:
            state = torch.load(mine, map_location="cpu", weights_only=True)
            _unwrap_optimizer(optimizer).load_state_dict(state)
