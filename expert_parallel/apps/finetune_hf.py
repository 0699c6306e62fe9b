"""Fine-tune a Hugging Face MoE model expert-parallel on the embedded corpus, then save it for plain
transformers.

    torchrun --standalone --nproc-per-node 2 examples/finetune_hf.py --family qwen3_moe --steps 100
    python examples/finetune_hf.py --model DIR --steps 20          # a local checkpoint, one process

Without ``--model`` it builds a tiny Qwen3-MoE or DeepSeek-V3 from its config class, byte-level
(vocabulary 256). The batches are bytes of CPython's documentation text, as in the LM example; the
progress bar, metrics.jsonl and the plots are the LM example's. At the end rank 0 writes a
``save_pretrained`` directory (OUT/model) that plain transformers loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..comm.distributed import DistContext, init_distributed
from ..comm.grads import clip_grad_norm_, sync_gradients, update_expert_bias
from ..integrations.ddp import data_parallel
from ..integrations.fsdp import fully_shard
from ..layer import MoE
from ..ops.losses import MoEAux
from .train import Traffic, get_batch, held_out_loss, load_corpus, merge_auxes, step_stats, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The fine-tuning command's options."""
    add = parser.add_argument
    add("--model", type=Path, default=None, help="a local transformers checkpoint (default: a tiny model)")
    add("--family", choices=("qwen3_moe", "deepseek_v3"), default="qwen3_moe", help="without --model")
    add("--out", type=Path, default=Path("runs/finetune_hf"))
    add("--ep-size", type=int, default=None)
    add("--backend", choices=("gloo", "nccl"), default=None)
    add("--steps", type=int, default=100)
    add("--batch-size", type=int, default=8, help="global batch, sequences per step")
    add("--seq-len", type=int, default=64)
    add("--lr", type=float, default=1e-3)
    add("--seed", type=int, default=0)
    add("--eval-every", type=int, default=25)
    add("--log-every", type=int, default=10)
    add("--no-plots", action="store_true")
    wrap = parser.add_mutually_exclusive_group()
    wrap.add_argument("--ddp", action="store_true", help="DistributedDataParallel through ep.data_parallel")
    wrap.add_argument("--fsdp", action="store_true", help="FSDP2 through ep.fully_shard")
    wrap.add_argument("--trainer", action="store_true",
                      help="train with transformers.Trainer (its own DDP) and ep.hf.ExpertParallelCallback")
    add("--activation-checkpointing", action="store_true",
        help="transformers' gradient checkpointing of every decoder layer (non-reentrant)")
    add("--grad-accum", type=int, default=1, help="micro-batches per optimizer step, synchronised once")
    add("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the DeepSpeed launcher


def tiny_config(family: str) -> Any:
    """A small byte-level model of the family (vocabulary 256), from its config class."""
    import transformers

    tf: Any = transformers  # config classes take these as keyword arguments (untyped here)
    common: dict[str, Any] = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**common, intermediate_size=128, moe_intermediate_size=32,
                                   num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                                   n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                                   kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16,
                                   qk_nope_head_dim=16)
    return tf.Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32,
                             num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)


def active_parameters_per_token(model: nn.Module) -> int:
    """Parameters one token uses: every parameter outside the experts (the embeddings, attention,
    routers, shared experts; tied weights once), and K experts of each MoE block."""
    experts_per_token = {id(p): m.cfg.top_k for m in model.modules() if isinstance(m, MoE)
                         for p in m.experts.parameters()}
    return sum(p.numel() // p.shape[0] * experts_per_token[id(p)] if id(p) in experts_per_token
               else p.numel() for p in model.parameters())


def accumulate(model: nn.Module, forward: nn.Module, ctx: DistContext, xs: tuple[Tensor, ...],
               blocks: list[Any]) -> tuple[Tensor, list[MoEAux]]:
    """Forward and backward of every micro-batch of the global batch (this rank's slice, loss / N),
    the wrappers' gradient synchronisation with the last only; the mean loss and merged statistics."""
    losses, per_micro = [], []
    for i, x in enumerate(xs):
        last = i == len(xs) - 1
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last)
        local = x.shape[0] // ctx.world_size
        sl = slice(ctx.rank * local, (ctx.rank + 1) * local)
        no_sync = (forward.no_sync() if isinstance(forward, DistributedDataParallel) and not last
                   else contextlib.nullcontext())
        with no_sync:
            # transformers shifts the labels itself: they are the inputs (y, the next bytes, is not)
            out = forward(x[sl].to(ctx.device), labels=x[sl].to(ctx.device))
            (out.loss / len(xs)).backward()
        losses.append(out.loss.detach())
        per_micro.append([b.last_aux for b in blocks if b.last_aux is not None])
    return torch.stack(losses).mean(), merge_auxes(per_micro)


def finetune_with_trainer(args: argparse.Namespace, ctx: DistContext, model: nn.Module, train_data: Tensor,
                          gen: torch.Generator) -> dict[str, Any]:
    """The same fine-tuning through transformers.Trainer (AdamW, clipping at 1.0, accumulation) with
    ep.hf.ExpertParallelCallback; Trainer's model directory at OUT/model; the summary (rank 0)."""
    from transformers import Trainer, TrainingArguments

    from .. import hf

    x, _ = get_batch(train_data, args.steps * args.batch_size, args.seq_len, gen)
    rows = [{"input_ids": row, "labels": row} for row in x]  # transformers shifts the labels
    leader = ctx.rank == 0
    targs = TrainingArguments(
        output_dir=str(args.out / "trainer"), per_device_train_batch_size=args.batch_size // (
            ctx.world_size * args.grad_accum), gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps, learning_rate=args.lr, weight_decay=0.01, lr_scheduler_type="constant",
        max_grad_norm=1.0, optim="adamw_torch", seed=args.seed, logging_steps=args.log_every,
        save_strategy="no", report_to=[], use_cpu=ctx.device.type == "cpu", disable_tqdm=not leader,
        gradient_checkpointing=args.activation_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[hf.ExpertParallelCallback(ctx)])
    result = trainer.train()
    trainer.save_model(str(args.out / "model"))  # rank 0 writes what the callback gathered
    losses = [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]
    if not leader:
        return {}
    blocks = [m for m in model.modules() if isinstance(m, hf.ExpertParallelBlock)]
    cfg = blocks[0].moe.cfg
    summary = {"trainer": True, "steps": args.steps, "world_size": ctx.world_size, "ep_size": ctx.ep_size,
               "losses": losses, "train_loss": result.training_loss, "top_k": cfg.top_k,
               "num_experts": cfg.num_experts, "active_parameters": active_parameters_per_token(model)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Trains, logs and saves; returns the summary (rank 0)."""
    from transformers import AutoModelForCausalLM

    from .. import hf

    ctx = init_distributed(ep_size=args.ep_size, backend=args.backend)
    if args.grad_accum < 1 or args.batch_size % (ctx.world_size * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the world size "
                         f"{ctx.world_size} times --grad-accum {args.grad_accum}")
    torch.manual_seed(args.seed)  # every rank builds the same model
    model: Any
    if args.model is not None:
        if not args.model.is_dir():
            raise FileNotFoundError(f"--model {args.model}: no such directory (a local transformers "
                                    "checkpoint)")
        model = hf.from_pretrained(args.model, ctx)
    else:
        model = hf.expert_parallelize(AutoModelForCausalLM.from_config(tiny_config(args.family)), ctx)
    model = model.to(ctx.device).train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.fsdp:
        fully_shard(model, ctx)
    data = load_corpus(None)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    gen = torch.Generator().manual_seed(args.seed + 1)
    if args.trainer:
        return finetune_with_trainer(args, ctx, model, train_data, gen)
    forward = data_parallel(model, ctx) if args.ddp else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    leader = ctx.rank == 0
    blocks = [m for m in model.modules() if isinstance(m, hf.ExpertParallelBlock)]
    records: list[dict[str, Any]] = []
    traffic = Traffic(ctx.world_size)
    if leader:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.jsonl").write_text("")
        tqdm.write(f"{model.config.model_type}: {len(blocks)} MoE blocks, {ctx.world_size} rank(s) "
                   f"launched by {ctx.launcher}, ep_size {ctx.ep_size}, {ctx.backend} on {ctx.device}")
    for step in tqdm(range(1, args.steps + 1), disable=not leader, desc="finetune", unit="step"):
        start = time.perf_counter()
        x, _ = get_batch(train_data, args.batch_size, args.seq_len, gen)
        optimizer.zero_grad()
        loss, auxes = accumulate(model, forward, ctx, x.chunk(args.grad_accum), blocks)
        if not (args.ddp or args.fsdp):  # those reduced in the backward
            sync_gradients(model, ctx)
        clip_grad_norm_(model, 1.0, ctx)
        optimizer.step()
        update_expert_bias(model, ctx)  # DeepSeek-V3's e_score_correction_bias; a no-op otherwise
        stats = step_stats(ctx, loss, auxes)
        traffic.add(stats.pop("sent_bytes"), ctx.ep_size)
        elapsed = time.perf_counter() - start
        rec = {"step": step, **stats, "tokens_per_s": args.batch_size * args.seq_len / elapsed}
        if step % args.eval_every == 0 or step == args.steps:
            # next-byte loss on 4 fixed held-out batches (the last 10 % of the text)
            rec["val_loss"] = held_out_loss(model, lambda x, y: model(x, labels=x).loss, ctx, val_data,
                                            args, batches=4)
        if leader:
            records.append(rec)
            with (args.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if step == 1 or step % args.log_every == 0:
                tqdm.write(f"step {step:5d}  loss {rec['loss']:.4f}  maxvio "
                           f"{sum(rec['max_violation']) / len(rec['max_violation']):.2f}  "
                           f"{rec['tokens_per_s']:,.0f} tok/s")
    hf.save_pretrained(model, args.out / "model", ctx)
    if not leader:
        return {}
    if not args.no_plots:
        from .plots import write_plots
        write_plots(args.out, records, traffic.matrix, traffic.per_node)
    cfg = blocks[0].moe.cfg
    routing = argparse.Namespace(ffn="moe", router=cfg.router, top_k=cfg.top_k, num_experts=cfg.num_experts)
    summary = summarize(records, routing, active_parameters_per_token(model))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
