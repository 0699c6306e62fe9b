"""Run under torchrun: transformers' Trainer and accelerate train expert-parallel models right.

    torchrun --standalone --nproc-per-node 2 tests/workers/hf_trainer.py CHECK OUT_DIR [--ep-size N]

CHECK is one of:
  trainer     Trainer (DDP, gradient accumulation 2, clipping, AdamW) on a tiny Qwen3-MoE made
              expert-parallel, with ep.hf.ExpertParallelCallback, equals the unmodified model trained
              by the same Trainer on the same data (every parameter; experts as this rank's slice);
              trainer.save_model writes what plain transformers loads with the trained logits.
  bias        the same for DeepSeek-V3 (aux-loss-free bias trained by the callback) against the
              model at EP 1 (all experts on every rank) under the same Trainer and callback.
  resume      Trainer checkpoints every 2 steps; a new run from checkpoint-2, whose experts and
              optimizer state were spoilt first, ends equal to the uninterrupted 4-step run.
  accelerate  an accelerate loop (prepare, accumulate, backward, step) equals the unmodified model's.
  best        save_strategy="epoch" and load_best_model_at_end: the model after train() and what
              trainer.save_model writes are the best checkpoint, experts included.
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
from tests.hf_models import tiny_config, tiny_model
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
    trainer = train(model, arguments(out / "ep"), ds, [ep.hf.ExpertParallelCallback(ctx)])
    assert compare(model, ref) > 10
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


def check_resume(ctx: ep.DistContext, out: Path) -> None:
    base = base_model("qwen3_moe")
    ds = dataset(ctx, steps=4)
    whole = ep.hf.expert_parallelize(copy.deepcopy(base), ctx)
    adamw = {"optim": "adamw_torch", "learning_rate": 3e-3}  # optimizer state to resume
    train(whole, arguments(out / "whole", steps=4, **adamw), ds, [ep.hf.ExpertParallelCallback(ctx)])
    part = ep.hf.expert_parallelize(copy.deepcopy(base), ctx)
    train(part, arguments(out / "part", steps=4, save_strategy="steps", save_steps=2, **adamw), ds,
          [ep.hf.ExpertParallelCallback(ctx)])
    resumed = ep.hf.expert_parallelize(copy.deepcopy(base), ctx)
    with torch.no_grad():  # what the checkpoint must replace
        for name, p in resumed.named_parameters():
            if ".moe.experts." in name:
                p.mul_(-3.0)
    train(resumed, arguments(out / "part", steps=4, **adamw), ds, [ep.hf.ExpertParallelCallback(ctx)],
          resume=str(out / "part" / "checkpoint-2"))
    for (name, p), (_, q) in zip(resumed.named_parameters(), whole.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, k=name: f"{k}: {m}")
    for (name, p), (_, q) in zip(part.named_parameters(), whole.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, k=name: f"{k}: {m}")
    from transformers import AutoModelForCausalLM  # a Trainer checkpoint is a transformers model
    plain = AutoModelForCausalLM.from_pretrained(str(out / "part" / "checkpoint-4"))
    mine = ep.hf.hf_state_dict(whole)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(value, mine[name], rtol=0, atol=0, msg=lambda m, k=name: f"{k}: {m}")


def check_best(ctx: ep.DistContext, out: Path) -> None:
    """save_strategy="epoch" with load_best_model_at_end: the model after train() is the best
    checkpoint, experts included, and trainer.save_model writes it."""
    base = base_model("qwen3_moe")
    model = ep.hf.expert_parallelize(copy.deepcopy(base), ctx)
    from transformers import AutoModelForCausalLM, Trainer
    args = arguments(out / "ep", steps=-1, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch",
                     load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
                     learning_rate=0.5)  # the highest eval loss: not the last epoch's model
    trainer = Trainer(model=model, args=args, train_dataset=dataset(ctx, steps=2), eval_dataset=Tokens(8, 64),
                      callbacks=[ep.hf.ExpertParallelCallback(ctx)])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6"), best
    saved = AutoModelForCausalLM.from_pretrained(best).state_dict()
    mine = ep.hf.hf_state_dict(model)
    for name, value in saved.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=0, msg=lambda m, k=name: f"{k}: {m}")
    trainer.save_model(str(out / "saved"))
    dist.barrier()
    final = AutoModelForCausalLM.from_pretrained(str(out / "saved")).state_dict()
    for name, value in saved.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=lambda m, k=name: f"{k}: {m}")


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


CHECKS = {"trainer": check_trainer, "bias": check_bias, "resume": check_resume, "best": check_best,
          "accelerate": check_accelerate, "no-callback": check_no_callback}


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
