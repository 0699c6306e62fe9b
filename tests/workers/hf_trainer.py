"""Run under torchrun: transformers' Trainer and accelerate train expert-parallel models right.

    torchrun --standalone --nproc-per-node 2 tests/workers/hf_trainer.py CHECK OUT_DIR [--ep-size N]

CHECK is one of:
  trainer     Trainer (DDP, gradient accumulation 2, clipping, AdamW) on a tiny Qwen3-MoE made
              expert-parallel, with ep.hf.ExpertParallelCallback, equals the unmodified model trained
              by the same Trainer on the same data (every parameter; experts as this rank's slice);
              trainer.save_model writes what plain transformers loads with the trained logits.
  bias        the same for DeepSeek-V3 (aux-loss-free bias trained by the callback) against the
              model at EP 1 (all experts on every rank) under the same Trainer and callback.
  resume      Trainer checkpoints every 2 steps; a new run from checkpoint-2, into a model whose every
              tensor was spoilt first, ends equal to the uninterrupted 4-step run (Qwen3-MoE).
  families    for every supported family: resume as above (checkpoints every step, resumed from
              checkpoint-1), routers checked by name first; save_strategy="epoch" with
              load_best_model_at_end and the first epoch the best: the model after train() and what
              trainer.save_model writes are the best checkpoint, every tensor. For Mixtral, a
              resume_from checkpoint differing from the resumed one in one replicated tensor in the
              middle of the file is refused.
  raises      Trainer runs raising in their second step (a callback, the forward, the backward, the
              data) leave args.max_grad_norm as the user set it and no hook of the callback on the model.
  accelerate  an accelerate loop (prepare, accumulate, backward, step) equals the unmodified model's.
  no-callback trainer.save_model without the callback fails at once on rank 0, naming
              ep.hf.save_pretrained; plain DistributedDataParallel of the prepared model trains right.
Prints "OK <check>" on rank 0.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import expert_parallel as ep
from tests.hf_models import FAMILIES, tiny_config, tiny_model
from tests.workers.hf_equivalence import expert_view

L, PER_DEVICE, ACCUM, STEPS = 16, 2, 2, 3


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, the same on every rank (Trainer's sampler splits them)."""

    def __init__(self, n: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(11)
        self.ids = torch.randint(0, vocab, (n, L), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def base_model(family: str) -> torch.nn.Module:
    model = tiny_model(family)
    model.config.output_router_logits = True  # the aux loss too goes through Trainer's loss
    return model


def arguments(out: Path, steps: int = STEPS, **kwargs: object):  # type: ignore[no-untyped-def]
    """Plain SGD unless told (AdamW would hide a gradient scale error); clipping that bites."""
    from transformers import TrainingArguments
    settings: dict[str, object] = dict(
        output_dir=str(out), per_device_train_batch_size=PER_DEVICE, gradient_accumulation_steps=ACCUM,
        max_steps=steps, optim="sgd", learning_rate=0.05, lr_scheduler_type="constant", weight_decay=0.01,
        max_grad_norm=0.3, use_cpu=True, ddp_backend="gloo", report_to=[], logging_strategy="no",
        save_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return TrainingArguments(**{**settings, **kwargs})


def dataset(ctx: ep.DistContext, steps: int = STEPS) -> Tokens:
    return Tokens(ctx.world_size * PER_DEVICE * ACCUM * steps, tiny_config("qwen3_moe").vocab_size)


def train(model: torch.nn.Module, args, ds: Tokens, callbacks: list | None = None,  # type: ignore[no-untyped-def]
          resume: str | None = None):  # type: ignore[no-untyped-def]
    from transformers import Trainer
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def compare(model: torch.nn.Module, ref: torch.nn.Module, rtol: float = 2e-5) -> int:
    """Every parameter of the expert-parallel model against the reference's (experts: this rank's
    slice); returns how many were compared."""
    n = 0
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if ".moe.experts." in name:
            block = model.get_submodule(name.split(".experts.")[0])
            want = expert_view(ref, name, block.experts.first, block.experts.num_local)
        elif ".moe.router." in name:
            continue  # the family router's own tensors, compared under their own names
        else:
            want = ref_params[name]
        torch.testing.assert_close(p.detach(), want.detach(), rtol=rtol, atol=1e-6,
                                   msg=lambda m, k=name: f"{k}: {m}")
        n += 1
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            torch.testing.assert_close(b, dict(ref.named_buffers())[name], rtol=0, atol=0)
            n += 1
    return n


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = Tokens(2, tiny_config("qwen3_moe").vocab_size).ids
    with torch.no_grad():
        return model.eval()(ids).logits


def check_trainer(ctx: ep.DistContext, out: Path) -> None:
    base = base_model("qwen3_moe")
    ds = dataset(ctx)
    ref = copy.deepcopy(base)
    train(ref, arguments(out / "ref"), ds)  # Trainer's own DDP on the unmodified model
    model = ep.hf.expert_parallelize(copy.deepcopy(base), ctx)
    args = arguments(out / "ep")
    trainer = train(model, args, ds, [ep.hf.ExpertParallelCallback(ctx)])
    assert compare(model, ref) > 10
    assert args.max_grad_norm == 0.3, args.max_grad_norm  # the user's again after training
    trainer.save_model(str(out / "saved"))  # rank 0 writes what the callback gathered at the end
    dist.barrier()
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(str(out / "saved"))
    torch.testing.assert_close(logits(plain), logits(ref), rtol=1e-5, atol=1e-5)


def check_bias(ctx: ep.DistContext, out: Path) -> None:
    base = base_model("deepseek_v3")
    ds = dataset(ctx)
    whole = ep.init_distributed(ep_size=1)  # every expert on every rank: the reference layout
    ref = ep.hf.expert_parallelize(copy.deepcopy(base), whole)
    train(ref, arguments(out / "ref"), ds, [ep.hf.ExpertParallelCallback(whole)])
    model = ep.hf.expert_parallelize(copy.deepcopy(base), ctx)
    train(model, arguments(out / "ep"), ds, [ep.hf.ExpertParallelCallback(ctx)])
    bias = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    start = [b for n, b in base.named_buffers() if n.endswith("e_score_correction_bias")]
    assert bias and all(not torch.equal(b, s) for b, s in zip(bias, start, strict=True)), "bias not trained"
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():  # both are ours: experts as slices of EP 1's
        want = ref_params[name]
        if ".moe.experts." in name:
            block = model.get_submodule(name.split(".experts.")[0])
            want = want[block.experts.first:block.experts.first + block.experts.num_local]
        torch.testing.assert_close(p.detach(), want.detach(), rtol=2e-5, atol=1e-6,
                                   msg=lambda m, k=name: f"{k}: {m}")
    for (name, b), (_, r) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        if name.endswith("e_score_correction_bias"):
            torch.testing.assert_close(b, r, rtol=0, atol=0)


def router_names(model: torch.nn.Module) -> list[str]:
    """The family routers' parameters (weight; gpt-oss's bias) of every expert-parallel block."""
    names = []
    for block_name, block in model.named_modules():
        if isinstance(block, ep.hf.ExpertParallelBlock):
            router = block.family_router()
            names += [f"{block_name}.{block.router_name}.{n}" for n, _ in router.named_parameters()]
    return names


def spoil(model: torch.nn.Module) -> None:
    """Every parameter and persistent buffer made wrong (the same on every rank): what a resume or
    a best-model reload must replace."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0).add_(0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(1.0)


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, rtol: float = 0.0) -> None:
    """Every tensor of ``want`` equal to ``got``'s of the same name (bitwise unless ``rtol``)."""
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=rtol / 10,
                                   msg=lambda m, k=name: f"{what} {k}: {m}")


def equal_runs(model: torch.nn.Module, ref: torch.nn.Module, what: str) -> None:
    """Every parameter and DeepSeek's bias of two runs of one expert-parallel layout equal (1e-6);
    the routers among them, checked by name."""
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    routers = router_names(ref)
    assert routers, what
    same(params, {n: ref_params[n] for n in routers}, f"{what} (router)", rtol=1e-6)  # named first
    same(params, ref_params, what, rtol=1e-6)
    biases = {n: b for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias")}
    same(dict(model.named_buffers()), biases, what, rtol=1e-6)


ADAMW = {"optim": "adamw_torch", "learning_rate": 3e-3}  # optimizer state to resume


def resume_family(ctx: ep.DistContext, out: Path, family: str, steps: int, every: int) -> None:
    """Trainer checkpoints every ``every`` steps; a new run from checkpoint-``every``, into a model
    whose every tensor was spoilt, ends equal to the uninterrupted run (routers included), and the
    last checkpoint loads in plain transformers as the gathered model."""
    base = base_model(family)
    ds = dataset(ctx, steps=steps)
    whole = ep.hf.expert_parallelize(copy.deepcopy(base), ctx)
    train(whole, arguments(out / "whole", steps=steps, **ADAMW), ds, [ep.hf.ExpertParallelCallback(ctx)])
    part = ep.hf.expert_parallelize(copy.deepcopy(base), ctx)
    train(part, arguments(out / "part", steps=steps, save_strategy="steps", save_steps=every, **ADAMW), ds,
          [ep.hf.ExpertParallelCallback(ctx)])
    resumed = ep.hf.expert_parallelize(copy.deepcopy(base), ctx)
    spoil(resumed)
    train(resumed, arguments(out / "part", steps=steps, **ADAMW), ds, [ep.hf.ExpertParallelCallback(ctx)],
          resume=str(out / "part" / f"checkpoint-{every}"))
    equal_runs(part, whole, f"{family} checkpointing run")
    equal_runs(resumed, whole, f"{family} resumed run")
    from transformers import AutoModelForCausalLM  # a Trainer checkpoint is a transformers model
    plain = AutoModelForCausalLM.from_pretrained(str(out / "part" / f"checkpoint-{steps}"))
    same(ep.hf.hf_state_dict(whole), plain.state_dict(), f"{family} last checkpoint")


def check_resume(ctx: ep.DistContext, out: Path) -> None:
    resume_family(ctx, out, "qwen3_moe", steps=4, every=2)


def first_is_best():  # type: ignore[no-untyped-def]
    """A callback giving each evaluation a decreasing ``eval_order``: with
    ``metric_for_best_model="order"`` the first checkpoint is the best, whatever the losses."""
    from transformers import TrainerCallback

    class FirstIsBest(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # type: ignore[no-untyped-def]
            metrics["eval_order"] = -float(state.global_step)

    return FirstIsBest()


def best_family(ctx: ep.DistContext, out: Path, family: str, epochs: int = 2) -> None:
    """save_strategy="epoch" with load_best_model_at_end (the first epoch's checkpoint the best):
    the model after train() is the best checkpoint, every tensor as plain transformers loads it
    (routers included, which differ in the last checkpoint), and trainer.save_model writes it."""
    from transformers import AutoModelForCausalLM, Trainer
    model = ep.hf.expert_parallelize(base_model(family), ctx)
    args = arguments(out / "ep", steps=-1, num_train_epochs=epochs, eval_strategy="epoch",
                     save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="order",
                     greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(ctx, steps=1), eval_dataset=Tokens(8, 64),
                      callbacks=[first_is_best(), ep.hf.ExpertParallelCallback(ctx)])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-1"), best
    saved = AutoModelForCausalLM.from_pretrained(best).state_dict()
    last = AutoModelForCausalLM.from_pretrained(str(out / "ep" / f"checkpoint-{epochs}")).state_dict()
    routers = [n for n in router_names(model) if n in saved]
    assert routers and all(not torch.equal(saved[n], last[n]) for n in routers), f"{family}: untrained"
    same(ep.hf.hf_state_dict(model), saved, f"{family} after train()")
    trainer.save_model(str(out / "saved"))
    dist.barrier()
    same(AutoModelForCausalLM.from_pretrained(str(out / "saved")).state_dict(), saved, f"{family} save_model")


def tampered_copy(ctx: ep.DistContext, folder: Path, to: Path) -> None:
    """A copy of a Trainer checkpoint (rank 0 writes it) with one replicated tensor in the middle of
    the file changed: neither the embeddings nor the file's first or last tensor."""
    import shutil

    from safetensors.torch import load_file, save_file
    if ctx.rank == 0:
        shutil.copytree(folder, to)
        tensors = load_file(str(to / "model.safetensors"))
        key = "model.layers.0.self_attn.q_proj.weight"
        assert key in tensors and key not in (min(tensors), max(tensors)), sorted(tensors)
        tensors[key] = tensors[key] + 1e-3
        save_file(tensors, str(to / "model.safetensors"), metadata={"format": "pt"})
    dist.barrier()


def guard_refuses_other_checkpoint(ctx: ep.DistContext, out: Path, family: str) -> None:
    """resume_from naming a checkpoint of the same step and layout that is not the one Trainer
    resumed from (one replicated tensor differs) is refused on every rank before anything is loaded."""
    tampered_copy(ctx, out / "part" / "checkpoint-1", out / "tampered")
    model = ep.hf.expert_parallelize(base_model(family), ctx)
    callback = ep.hf.ExpertParallelCallback(ctx, resume_from=out / "tampered")
    try:
        train(model, arguments(out / "other", steps=2, **ADAMW), dataset(ctx, steps=2), [callback],
              resume=str(out / "part" / "checkpoint-1"))
    except ValueError as e:
        assert "is not the checkpoint Trainer resumed from" in str(e), e
    else:
        raise AssertionError(f"{family}: a checkpoint differing in one replicated tensor was accepted")


def check_families(ctx: ep.DistContext, out: Path) -> None:
    """resume (every tensor spoilt first) and best-model reload for every supported family, and the
    checkpoint guard on a tensor in the middle of the file."""
    for family in FAMILIES:
        start = time.perf_counter()
        resume_family(ctx, out / family / "resume", family, steps=2, every=1)
        best_family(ctx, out / family / "best", family)
        if family == "mixtral":
            guard_refuses_other_checkpoint(ctx, out / family / "resume", family)
        if ctx.rank == 0:
            print(f"{family}: resume and best OK in {time.perf_counter() - start:.1f} s", flush=True)


class PlantedError(Exception):
    """Raised on purpose in the middle of training."""


class RaisingTokens(Tokens):
    """Tokens whose fetches raise PlantedError after the first ``after`` (on each rank)."""

    def __init__(self, n: int, vocab: int, after: int) -> None:
        super().__init__(n, vocab)
        self.after, self.calls = after, 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls > self.after:
            raise PlantedError("data")
        return super().__getitem__(i)


def plant(model: torch.nn.Module, where: str) -> list:  # type: ignore[type-arg]
    """Makes the second optimizer step raise PlantedError: in a callback's on_step_end, in the
    forward or in the backward of its last micro-batch (the one Trainer clips after). Returns the
    callbacks to add."""
    from transformers import TrainerCallback
    calls = [0]

    def count() -> bool:  # the 4th training micro-batch: step 2's last (accumulation 2)
        calls[0] += 1
        return calls[0] == 2 * ACCUM

    def raising(*_: object) -> None:
        raise PlantedError(where)

    class RaiseAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == 2:
                raise PlantedError(where)

    if where == "forward":
        layer = model.get_submodule("model.layers.1")
        layer.register_forward_pre_hook(lambda m, i: raising() if m.training and count() else None)
    if where == "backward":
        def hook_gradient(m: torch.nn.Module, i: object, o: torch.Tensor) -> None:
            if m.training and count():
                o.register_hook(raising)  # the final norm's output gradient: mid-backward
        model.get_submodule("model.norm").register_forward_hook(hook_gradient)
    return [RaiseAtStep2()] if where == "callback" else []


def check_raises(ctx: ep.DistContext, out: Path) -> None:
    """A Trainer run that raises in its second step (in a callback, the forward, the backward, the
    data) leaves args.max_grad_norm as the user set it and the model without the callback's hooks: a
    forward and backward of the user's own afterwards leaves it so too; a run that ends normally as
    well."""
    for where in ("callback", "forward", "backward", "data"):
        model = ep.hf.expert_parallelize(base_model("qwen3_moe"), ctx)
        args = arguments(out / where, steps=3)
        ds = dataset(ctx)
        if where == "data":  # this rank's first step's samples, then an error
            ds = RaisingTokens(len(ds), tiny_config("qwen3_moe").vocab_size, after=PER_DEVICE * ACCUM)
        try:
            train(model, args, ds, [*plant(model, where), ep.hf.ExpertParallelCallback(ctx)])
        except PlantedError:
            pass
        else:
            raise AssertionError(f"{where}: PlantedError was not raised")
        assert args.max_grad_norm == 0.3, (where, args.max_grad_norm)
        assert not model._forward_hooks, (where, model._forward_hooks)
        ids = dataset(ctx).ids[:2]
        model.train()(input_ids=ids, labels=ids).loss.backward()  # the user's own step afterwards
        assert args.max_grad_norm == 0.3, (where, args.max_grad_norm)
    model = ep.hf.expert_parallelize(base_model("qwen3_moe"), ctx)
    args = arguments(out / "normal", steps=2)
    train(model, args, dataset(ctx, steps=2), [ep.hf.ExpertParallelCallback(ctx)])
    assert args.max_grad_norm == 0.3 and not model._forward_hooks, args.max_grad_norm


def accelerate_loop(model: torch.nn.Module, ds: Tokens) -> None:
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=0.01)  # AdamW hides scale errors
    loader = torch.utils.data.DataLoader(ds, batch_size=PER_DEVICE, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()


def check_accelerate(ctx: ep.DistContext, out: Path) -> None:
    base = base_model("qwen3_moe")
    ds = dataset(ctx)
    ref = copy.deepcopy(base)
    accelerate_loop(ref, ds)
    model = ep.hf.expert_parallelize(copy.deepcopy(base), ctx)
    accelerate_loop(model, ds)
    assert compare(model, ref) > 10


def check_no_callback(ctx: ep.DistContext, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel
    base = base_model("qwen3_moe")
    ref = copy.deepcopy(base).train()
    model = ep.hf.expert_parallelize(copy.deepcopy(base), ctx).train()
    ids = dataset(ctx).ids[ctx.rank * 4:(ctx.rank + 1) * 4]
    for net in (ref, model):  # one SGD step under a user's own DistributedDataParallel
        ddp = DistributedDataParallel(net)
        ddp(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in net.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    assert compare(model, ref) > 10
    trainer = train(model, arguments(out / "ep"), dataset(ctx))
    start = time.perf_counter()
    try:
        trainer.save_model(str(out / "saved"))
    except RuntimeError as e:
        assert ctx.rank == 0 and "ep.hf.save_pretrained" in str(e) and "every rank" in str(e), e
        assert time.perf_counter() - start < 5.0
        print("rank 0: save refused at once", flush=True)
    else:
        assert ctx.rank != 0, "rank 0 saved only its own experts"
    assert not (out / "saved" / "model.safetensors").exists()


CHECKS = {"trainer": check_trainer, "bias": check_bias, "resume": check_resume,
          "accelerate": check_accelerate, "no-callback": check_no_callback, "families": check_families,
          "raises": check_raises}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--ep-size", type=int, default=2)
    args = parser.parse_args()
    ctx = ep.init_distributed(ep_size=args.ep_size, timeout=60)
    torch.manual_seed(0)
    CHECKS[args.check](ctx, args.out)
    if ctx.rank == 0:
        print(f"OK {args.check}", flush=True)
    ep.shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
