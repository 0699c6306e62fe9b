"""Hugging Face Trainer with expert-parallel models: ``ep.hf.ExpertParallelCallback``.

Training itself needs nothing from here: ``ep.hf.expert_parallelize`` prepares the model for any
DistributedDataParallel wrapper (``ep.prepare_ddp``), Trainer's among them. Four things in Trainer's
loop are per rank and so wrong for experts that differ between ranks; the callback does them for
the whole job:

- gradient clipping: Trainer clips with each rank's own gradient norm (its experts differ), so the
  ranks would scale their replicated gradients differently and drift apart. The callback clips with
  the job's norm (``ep.clip_grad_norm_``) at ``args.max_grad_norm`` just before the optimizer step,
  and switches Trainer's clipping off for its check alone: ``args.max_grad_norm`` reads 0 only from
  the end of a micro-batch's backward (a callback queued by autograd; a backward that raises runs
  none) to the next callback event (the sub-step's end, or the pre-optimizer step), a window of
  Trainer's bookkeeping with no model, data or user code in it. An exception anywhere else (data,
  forward, backward, a callback, a save, the optimizer) leaves ``args`` as the user set it;
- the aux-loss-free bias (DeepSeek-V3, GLM-4.5): ``ep.update_expert_bias`` after each optimizer
  step, from the job's counts summed over the micro-batches;
- saving: Trainer saves on rank 0 alone, which holds only its own experts. When a save is due (a
  step's or an epoch's end, decided over the job; the end of training) every rank gathers the model
  into transformers' layout and Trainer's writing ranks keep it until the next step;
  ``model.save_pretrained`` there (which ``trainer.save_model`` calls) writes that. Every rank also
  writes its own optimizer state into the checkpoint;
- resuming (and ``load_best_model_at_end``): transformers loads the checkpoint's tensors whose names
  on disk are the model's and rank 0's optimizer state on every rank; it misses the experts (another
  layout) and, where the names on disk differ (Mixtral's ``block_sparse_moe``), the routers. After
  checking that the checkpoint is the one Trainer loaded (every tensor Trainer loaded equal,
  bitwise) and written at the same layout and step, the callback loads every tensor of the model
  from the checkpoint's safetensors (replicated ones all, experts this rank's rows) and this rank's
  optimizer state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback

from ..comm.distributed import DistContext
from ..comm.grads import clip_grad_norm_, update_expert_bias
from ..ops.private import queue_callback
from .hf import ExpertParallelBlock, forget_kept, keep_for_save, load_hf_checkpoint, matches_checkpoint

OPTIMIZER_FILE = "expert_parallel_optimizer_rank{rank}.pt"


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate's AcceleratedOptimizer holds the torch optimizer in ``.optimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def _anywhere(flag: bool, ctx: DistContext) -> bool:
    """Whether ``flag`` is set on any rank (a collective): every rank then takes the same branch."""
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.world_group)  # NOTE: collective over the job
    return bool(t.item())


class ExpertParallelCallback(TrainerCallback):
    """Makes ``transformers.Trainer`` right for a model made expert-parallel by ``ep.hf``.

    ``Trainer(model=model, ..., callbacks=[ep.hf.ExpertParallelCallback(ctx)])`` on every rank, the
    last of the callbacks (it reads the save decision the others made). ``resume_from``: the
    checkpoint directory given to ``trainer.train(resume_from_checkpoint=...)`` when it is not
    ``args.output_dir/checkpoint-N`` (Trainer does not tell its callbacks). See the module's
    docstring for what it does; docs/hf.md for the whole recipe.
    """

    def __init__(self, ctx: DistContext, resume_from: str | Path | None = None) -> None:
        self.ctx = ctx
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.max_grad_norm = 0.0  # the user's args.max_grad_norm, read when training begins
        self._args: Any = None  # the TrainingArguments of the run in progress
        self._taken = False  # whether args.max_grad_norm reads 0 now (Trainer's clipping check)
        self._hook: RemovableHandle | None = None  # on the model, for its next forward

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or not any(isinstance(m, ExpertParallelBlock) for m in model.modules()):
            raise ValueError("ExpertParallelCallback: the model has no expert-parallel block; make it "
                             "expert-parallel first (ep.hf.expert_parallelize or ep.hf.from_pretrained)")
        if str(args.save_strategy).lower().endswith("best"):
            raise ValueError("ExpertParallelCallback: save_strategy='best' decides to save after the "
                             "callbacks ran, on rank 0's metrics; use 'steps' or 'epoch' (with "
                             "load_best_model_at_end=True for the best model)")
        self._give_back()  # a run that stopped inside the window (see the module's docstring)
        self._take_over_clipping(args)
        if state.global_step > 0:
            folder = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._resume(folder, state, model, optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        self._release_clipping()
        assert model is not None
        if args.load_best_model_at_end and state.best_model_checkpoint:
            # Trainer loaded the tensors named on disk as in the model: not the experts, nor
            # Mixtral's routers
            load_hf_checkpoint(model, state.best_model_checkpoint)
        keep_for_save(model, self.ctx, keep=args.should_save,  # NOTE: collective: for trainer.save_model
                      only_rank0=not args.save_on_each_node)

    def _take_over_clipping(self, args: Any) -> None:
        """Reads the user's ``max_grad_norm`` (clipped by :meth:`on_pre_optimizer_step`)."""
        self._args, self.max_grad_norm = args, float(args.max_grad_norm or 0.0)

    def _release_clipping(self) -> None:
        """``args.max_grad_norm`` the user's again, the hook removed (the end of training)."""
        self._give_back()
        self._unhook()
        self._args = None

    def _hook_next_forward(self, model: nn.Module | None) -> None:
        """Before a micro-batch: its forward (once) hooks its output, so that the end of the backward
        through it calls :meth:`_take`. Called even if the forward raises (then it only unhooks)."""
        self._unhook()
        if self.max_grad_norm > 0 and model is not None:
            self._hook = model.register_forward_hook(self._after_forward, always_call=True)

    def _unhook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _after_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._unhook()  # one forward per micro-batch: a later one (the user's own) is left alone
        if output is None or not (module.training and torch.is_grad_enabled()):
            return  # the forward raised, or it is not a training forward
        values = output.values() if isinstance(output, dict) else output  # a ModelOutput is a dict
        values = [output] if isinstance(output, Tensor) else values
        # every output that takes a gradient (a compute_loss of the user's may use the logits only);
        # _take is idempotent, so a backward through several of them takes over once
        for t in values:
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(self._queue_take)

    def _queue_take(self, grad: Tensor) -> None:
        queue_callback(self._take)  # run when this backward completes; never if it raises

    def _take(self) -> None:
        """Trainer's clipping check, next, reads 0: the callback clips with the job's norm."""
        if self._args is not None:
            self._args.max_grad_norm, self._taken = 0.0, True

    def _give_back(self) -> None:
        if self._taken and self._args is not None:
            self._args.max_grad_norm = self.max_grad_norm
        self._taken = False

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                      **kwargs: Any) -> None:
        if model is not None:
            forget_kept(model)  # the gathered copy of the last save: host memory back
        self._hook_next_forward(model)

    def on_substep_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        self._give_back()  # a micro-batch without an optimizer step: Trainer does not clip
        self._hook_next_forward(model)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                              **kwargs: Any) -> None:
        if self.max_grad_norm <= 0:
            return
        if not self._taken:
            raise RuntimeError("ExpertParallelCallback: Trainer clipped with this rank's gradient norm "
                               "(no output of the model's training forward reached the backward)")
        self._give_back()
        assert model is not None
        clip_grad_norm_(model, self.max_grad_norm, self.ctx)  # NOTE: collective

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                          **kwargs: Any) -> None:
        assert model is not None
        update_expert_bias(model, self.ctx)  # NOTE: collective (nothing without a biased router)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        self._gather_if_saving(args, control, model)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        self._gather_if_saving(args, control, model)

    def _gather_if_saving(self, args: Any, control: Any, model: nn.Module | None) -> None:
        """Trainer saves right after this on its writing ranks: gather the model for them. The
        decision is taken over the job (a rank-local saver would otherwise leave ranks apart)."""
        if _anywhere(bool(control.should_save), self.ctx):
            control.should_save = True
            assert model is not None
            keep_for_save(model, self.ctx, keep=args.should_save,  # NOTE: collective
                          only_rank0=not args.save_on_each_node)

    def on_save(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is None or getattr(args, "save_only_model", False):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"layout": self._layout(), "global_step": state.global_step,
                    "optimizer": _unwrap_optimizer(optimizer).state_dict()},
                   folder / OPTIMIZER_FILE.format(rank=self.ctx.rank))

    def _layout(self) -> dict[str, int]:
        return {"world_size": self.ctx.world_size, "ep_size": self.ctx.ep_size, "rank": self.ctx.rank}

    def _resume(self, folder: Path, state: Any, model: nn.Module, optimizer: Any) -> None:
        """Every tensor of the model (experts: this rank's) and this rank's optimizer state from the
        checkpoint Trainer is resuming from."""
        mine = folder / OPTIMIZER_FILE.format(rank=self.ctx.rank)
        if not mine.is_file():
            raise ValueError(f"ExpertParallelCallback: resuming at step {state.global_step}, but {mine} "
                             f"is missing: resume from a checkpoint this callback wrote (pass "
                             f"ExpertParallelCallback(ctx, resume_from=DIR) when it is not in output_dir)")
        saved = torch.load(mine, map_location="cpu", weights_only=True)
        if saved["layout"] != self._layout() or saved["global_step"] != state.global_step:
            raise ValueError(f"ExpertParallelCallback: {mine} was written at step {saved['global_step']} "
                             f"by {saved['layout']}; this run resumes at step {state.global_step} as "
                             f"{self._layout()}: resume with the same world and expert-parallel sizes "
                             f"(or reshard with ep.save_checkpoint / ep.load_checkpoint)")
        if not matches_checkpoint(model, folder):  # before loading: what Trainer loaded
            raise ValueError(f"ExpertParallelCallback: {folder} is not the checkpoint Trainer resumed "
                             f"from (its replicated weights differ); pass resume_from=DIR")
        load_hf_checkpoint(model, folder)
        if optimizer is not None:
            _unwrap_optimizer(optimizer).load_state_dict(saved["optimizer"])
