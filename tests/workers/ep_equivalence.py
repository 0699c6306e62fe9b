"""Run under torchrun: expert-parallel MoE == single-device reference, case by case.

    torchrun --standalone --nproc-per-node 4 tests/workers/ep_equivalence.py --ep-size 2
    torchrun --standalone --nproc-per-node 2 tests/workers/ep_equivalence.py --ep-size 2 --backend nccl

Every rank also builds the single-device reference and runs it on every rank's slice (group
boundaries at rank boundaries), so each rank can check its own numbers. Prints "ALL OK <n>" on rank 0.
"""

from __future__ import annotations

import argparse
import math
import random
import sys

import torch
from torch import nn

import expert_parallel as ep
from expert_parallel.ops.routing import capacity

D, F, E, L = 8, 12, 8, 8
TOL = dict(rtol=1e-5, atol=1e-6)
# --exchange / --ranks-per-node: the exchange of every case that has token copies (not soft), and
# the ranks per node it sees (None: the launcher's LOCAL_WORLD_SIZE)
LAYOUT: dict = dict(exchange="flat", ranks_per_node=None, compile=False)

# sigmoid scores, aux-loss-free bias, 2 of 4 expert groups, routed scale, a gated shared expert,
# the sequence-wise balance loss
DEEPSEEK = dict(score_func="sigmoid", bias_update_rate=0.01, num_expert_groups=4, num_limited_groups=2,
                route_scale=2.5, num_shared_experts=1, shared_expert_gate=True, seq_aux_loss_coef=0.1)

CASES = {
    # name: (config overrides, training, batch sizes per rank (None = 2 each), block the last EP rank)
    "topk_k1_capacity": (dict(top_k=1, capacity_factor=1.0), True, None, False),
    "topk_k2_capacity_drops": (dict(capacity_factor=0.5), True, None, False),
    "topk_k2_probs_drops": (dict(capacity_factor=0.75, drop_policy="probs"), True, None, False),
    "topk_k2_dropless": (dict(capacity_factor=None), True, None, False),
    "topk_k1_dropless_swiglu_bias": (dict(top_k=1, capacity_factor=None, activation="swiglu", bias=True),
                                     True, None, False),
    "noisy_topk_eval": (dict(router="noisy_topk", capacity_factor=0.75), False, None, False),
    "topk_groups_geglu": (dict(group_size=4, capacity_factor=1.0, activation="geglu"), True, None, False),
    "eval_dropless": (dict(capacity_factor=0.5, eval_capacity_factor=None), False, None, False),
    "expert_choice": (dict(router="expert_choice", capacity_factor=1.0), True, None, False),
    "expert_choice_bias": (dict(router="expert_choice", capacity_factor=0.5, bias=True), True, None, False),
    "soft": (dict(router="soft", slots_per_expert=2), True, None, False),
    "dropless_uneven_batches": (dict(capacity_factor=None), True, "uneven", False),
    "capacity_uneven_batches": (dict(capacity_factor=1.0), True, "uneven", False),
    "expert_choice_uneven_batches": (dict(router="expert_choice", capacity_factor=1.0), True, "uneven",
                                     False),
    "capacity_last_rank_idle": (dict(capacity_factor=1.0), True, None, True),
    "deepseek_v3_capacity": (dict(DEEPSEEK, capacity_factor=1.0), True, None, False),
    "deepseek_v3_dropless_uneven": (dict(DEEPSEEK, capacity_factor=None, activation="swiglu"), True,
                                    "uneven", False),
    "qwen2_shared_gate": (dict(num_shared_experts=1, shared_expert_gate=True, normalize_topk=False,
                               capacity_factor=None), True, None, False),
    "sigmoid_bias_eval": (dict(score_func="sigmoid", bias_update_rate=0.01, capacity_factor=0.75), False,
                          None, False),
    "dropless_last_rank_idle": (dict(capacity_factor=None, top_k=1), True, "uneven", True),
}


def batch_sizes(kind: str | None, world: int) -> list[int]:
    if kind == "uneven":  # includes a rank with no tokens at all
        return [(3, 1, 0, 2)[r % 4] for r in range(world)]
    if kind is not None and kind.startswith("equal"):
        return [int(kind[5:])] * world
    return [2] * world


def random_cases(count: int, seed: int) -> dict[str, tuple[dict, bool, str | None, bool]]:
    """Seeded random configurations (the same on every rank): router, K, capacity or dropless, drop
    policy, group size, activation, bias, train/eval, batch sizes."""
    rng = random.Random(seed)
    cases = {}
    for i in range(count):
        router = rng.choice(["topk", "topk", "noisy_topk", "expert_choice", "soft"])
        dropless = router in ("topk", "noisy_topk") and rng.random() < 0.4
        batch = rng.choice([1, 2, 3])
        overrides = dict(
            router=router, top_k=rng.randint(1, 3), drop_policy=rng.choice(["position", "probs"]),
            capacity_factor=None if dropless else rng.choice([0.5, 1.0, 1.5, 2.0]),
            eval_capacity_factor=None if dropless else 1.0, activation=rng.choice(
                ["relu", "gelu", "swiglu", "geglu"]), bias=rng.random() < 0.5,
            slots_per_expert=rng.randint(1, 2),
            group_size=rng.choice([None, L, 2 * L if batch % 2 == 0 else L, L // 2]))
        training = router != "noisy_topk" and rng.random() < 0.7
        kind = "uneven" if rng.random() < 0.3 else f"equal{batch}"
        mode = "dropless" if dropless else "capacity"
        cases[f"random{i}_{router}_{mode}"] = (overrides, training, kind, False)
    return cases


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def make_data(sizes: list[int], block: bool,
              device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(b, L, D, generator=g) for b in sizes]
    ws = [torch.randn(b, L, D, generator=g) for b in sizes]
    if block:  # a constant feature that the blocked experts' router rows punish
        for x in xs:
            x[..., 0] = 10.0
    return [x.to(device) for x in xs], [w.to(device) for w in ws]


def reference(cfg: ep.MoEConfig, training: bool, block: bool, ctx: ep.DistContext) -> ep.MoE:
    torch.manual_seed(0)
    ref = ep.MoE(cfg).train(training).to(ctx.device)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for name, p in ref.named_parameters():
            if ".b_" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.device))
        if getattr(ref.router, "expert_bias", None) is not None:
            ref.router.expert_bias.copy_(torch.randn(E, generator=g) * 0.1)
        if block:
            e = E // ctx.ep_size
            ref.router.weight[:, 0] = 0.0
            ref.router.weight[E - e:, 0] = -50.0
    return ref


def run_case(ctx: ep.DistContext, name: str) -> None:
    overrides, training, kind, block = CASES[name]
    exchange = LAYOUT["exchange"] if overrides.get("router") != "soft" else "flat"
    cfg = ep.MoEConfig(**{**dict(d_model=D, d_ff=F, num_experts=E, top_k=2, min_capacity=1,
                                 exchange=exchange), **overrides})
    W, r = ctx.world_size, ctx.rank
    # Layout-independent initialisation: same seed, same experts, whatever the layout.
    torch.manual_seed(0)
    moe = ep.MoE(cfg, ep_group=ctx.ep_group, ranks_per_node=LAYOUT["ranks_per_node"]).train(training)
    moe = moe.to(ctx.device)
    ref = reference(cfg, training, block, ctx)
    torch.manual_seed(0)
    for key, value in ep.MoE(cfg).state_dict().items():
        assert torch.equal(moe.full_state_dict()[key].cpu(), value), f"{name}: init of {key}"
    moe.load_full_state_dict(ref.state_dict())

    sizes = batch_sizes(kind, W)
    xs, ws = make_data(sizes, block, ctx.device)
    # Expert-parallel: my slice only (--compile: through torch.compile, a fresh compilation per case).
    x = xs[r].clone().requires_grad_()
    if LAYOUT["compile"]:
        torch._dynamo.reset()
    y, aux = (torch.compile(moe) if LAYOUT["compile"] else moe)(x)
    ((y * ws[r]).sum() + aux.loss).backward()
    ep.sync_gradients(moe, ctx)
    # Reference: every slice separately (groups end at rank boundaries), loss = mean over ranks.
    ref_x = [xi.clone().requires_grad_() for xi in xs]
    ref_out = [ref(xi) for xi in ref_x]
    total = sum((yi * wi).sum() + ai.loss for (yi, ai), wi in zip(ref_out, ws, strict=True))
    (total / W).backward()

    y_ref, aux_ref = ref_out[r]
    close(y, y_ref, f"{name}: output")
    if cfg.exchange == "hierarchical":  # before update_expert_bias moves the bias
        check_against_flat(moe, cfg, xs[r], y, aux, ctx, name)
    assert x.grad is not None and ref_x[r].grad is not None
    close(x.grad, ref_x[r].grad * W, f"{name}: input grad")
    for field in ("loss", "load_balance_loss", "z_loss", "router_entropy", "dropped_fraction",
                  "seq_balance_loss"):
        close(getattr(aux, field).float(), getattr(aux_ref, field).float(), f"{name}: aux.{field}")
    group_ranks = range(ctx.dp_rank * ctx.ep_size, (ctx.dp_rank + 1) * ctx.ep_size)
    # MaxVio counts the selections of the whole EP group (like expert_counts); a token's selection
    # does not depend on its routing group, so the reference sees the group's tokens at once.
    with torch.no_grad():
        _, aux_group = ref(torch.cat([xs[q] for q in group_ranks]))
    close(aux.max_violation, aux_group.max_violation, f"{name}: aux.max_violation")
    counts = sum(ref_out[q][1].expert_counts for q in group_ranks)
    assert torch.equal(aux.expert_counts, counts), f"{name}: expert_counts {aux.expert_counts} {counts}"
    check_param_grads(moe, ref, name)
    check_grad_norm(moe, ref, ctx, name)
    check_expert_bias(moe, ref, ctx, name)
    check_comm(aux, cfg, sizes[r], training, name, block and ctx.ep_rank == ctx.ep_size - 1)


def check_against_flat(moe: ep.MoE, cfg: ep.MoEConfig, x: torch.Tensor, y: torch.Tensor, aux: ep.MoEAux,
                       ctx: ep.DistContext, name: str) -> None:
    """The flat exchange on the same weights and input: the same output, and at least as many bytes
    crossing a node boundary (copies of a token bound for one node cross once when hierarchical)."""
    flat = ep.MoE(cfg.replace(exchange="flat"), ep_group=ctx.ep_group,
                  ranks_per_node=LAYOUT["ranks_per_node"]).train(moe.training).to(ctx.device)
    flat.load_state_dict(moe.state_dict())
    if cfg.router == "noisy_topk" and moe.training:
        return  # the noise differs between the two calls
    y_flat, aux_flat = flat(x)
    close(y, y_flat, f"{name}: hierarchical vs flat output")
    if ctx.device.type == "cpu":  # bf16 rows: both exchanges round the expert outputs, and no more
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y16, y16_flat = moe(x)[0], flat(x)[0]
        close(y16.float(), y16_flat.float(), f"{name}: bf16 hierarchical vs flat output")
    assert aux.comm is not None and aux_flat.comm is not None
    # over the whole group (a proxy carries its node-mates' rows, so single ranks can differ)
    totals = torch.tensor([aux.comm.bytes_by_class["inter"], aux_flat.comm.bytes_by_class["inter"],
                           sum(aux.comm.meta_bytes)], dtype=torch.float64, device=ctx.device)
    torch.distributed.all_reduce(totals, group=ctx.ep_group)
    inter, inter_flat, meta = totals.tolist()
    assert inter - meta <= inter_flat, f"{name}: inter-node bytes {inter} - {meta} > flat {inter_flat}"


def check_param_grads(moe: ep.MoE, ref: ep.MoE, name: str) -> None:
    ref_grads = dict(ref.named_parameters())
    first, count = moe.experts.first, moe.experts.num_local
    for pname, p in moe.named_parameters():
        g_ref = ref_grads[pname].grad
        if g_ref is None:  # unused on every rank (noise weight in eval): no gradient, as in one process
            assert p.grad is None, f"{name}: sync_gradients made a gradient for unused {pname}"
            continue
        assert p.grad is not None, f"{name}: sync_gradients left no grad for {pname}"
        if pname.startswith("experts."):
            g_ref = g_ref[first:first + count]
        close(p.grad, g_ref, f"{name}: grad of {pname}")


def check_expert_bias(moe: ep.MoE, ref: ep.MoE, ctx: ep.DistContext, name: str) -> None:
    """After update_expert_bias, every rank's bias equals the single-device update on all ranks'
    tokens (the reference saw every rank's slice)."""
    if getattr(moe.router, "expert_bias", None) is None:
        return
    before = ref.router.expert_bias.clone()
    ep.update_expert_bias(moe, ctx)
    ep.update_expert_bias(ref)
    assert torch.equal(moe.router.expert_bias, ref.router.expert_bias), f"{name}: expert_bias"
    # training forwards counted their selections, so the update moved the bias; eval ones did not
    assert torch.equal(ref.router.expert_bias, before) != moe.training, f"{name}: bias update"


def check_grad_norm(moe: ep.MoE, ref: ep.MoE, ctx: ep.DistContext, name: str) -> None:
    expected = torch.sqrt(sum(p.grad.square().sum() for p in ref.parameters() if p.grad is not None))
    close(ep.grad_norm(moe, ctx), expected, f"{name}: grad_norm")
    expected_inf = max(p.grad.abs().max() for p in ref.parameters() if p.grad is not None)
    close(ep.grad_norm(moe, ctx, math.inf), expected_inf, f"{name}: grad_norm inf")


def check_comm(aux: ep.MoEAux, cfg: ep.MoEConfig, batch: int, training: bool, name: str,
               idle: bool) -> None:
    comm = aux.comm
    assert comm is not None and comm.row_elements == D and comm.element_size == 4
    S = cfg.group_size or batch * L
    G = batch * L // S if S else 0
    # Both exchange modes send exactly the kept rows (capacity mode only adds the drops).
    if cfg.router == "soft":
        kept = G * E * cfg.slots_per_expert
    elif cfg.router == "expert_choice":
        C = min(max(cfg.min_capacity, math.ceil(cfg.capacity_factor_for(training) * S / E - 1e-9)), S)
        kept = G * E * C
    else:
        kept = round((1 - aux.dropped_fraction.item()) * G * S * cfg.top_k)
    if comm.mode != "local":
        assert comm.mode == ("dropless" if cfg.capacity_factor_for(training) is None else "capacity"), comm
    assert sum(comm.bytes_by_class.values()) == sum(comm.sent_bytes)
    if comm.exchange == "hierarchical":
        return  # rows per peer depend on the deduplication; checked against the flat exchange
    C = capacity(cfg, S, training) if cfg.router in ("topk", "noisy_topk") else None
    if comm.mode == "local" and C is not None:  # one process copies the rows of a padded plan
        kept = min(G * S * cfg.top_k, cfg.num_experts * G * C)  # (CPU grouped_mm here), drops included
    assert sum(comm.sent_rows) == kept, f"{name}: traffic {comm} vs {kept} kept rows"
    if idle and comm.mode != "local":
        assert sum(comm.recv_rows) == 0, f"{name}: idle rank received rows"
    pairs = zip(comm.sent_rows, comm.recv_rows, strict=True)
    assert comm.sent_bytes == tuple((s + q) * D * 4 for s, q in pairs)


class TwoLayer(nn.Module):
    """Input projection, then two residual MoE layers (capacity top-2, then dropless top-1)."""

    def __init__(self, group: object | None) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        base = dict(d_model=D, d_ff=F, num_experts=E, min_capacity=1, exchange=LAYOUT["exchange"])
        rpn = LAYOUT["ranks_per_node"]
        self.moe1 = ep.MoE(ep.MoEConfig(**base, top_k=2, capacity_factor=1.0), ep_group=group,  # type: ignore[arg-type]
                           ranks_per_node=rpn)
        self.moe2 = ep.MoE(ep.MoEConfig(**base, top_k=1, capacity_factor=None, activation="swiglu"),
                           ep_group=group, ranks_per_node=rpn)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(x)
        y1, a1 = self.moe1(h)
        h = h + y1
        y2, a2 = self.moe2(h)
        return h + y2, a1.loss + a2.loss


def train_steps(ctx: ep.DistContext, steps: int = 20) -> None:
    """20 AdamW steps with clipping under EP x DP == 20 steps in one process on the same batches."""
    W, r = ctx.world_size, ctx.rank
    torch.manual_seed(0)
    model = TwoLayer(ctx.ep_group).to(ctx.device)
    torch.manual_seed(0)
    ref = TwoLayer(None).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        xs = [torch.randn(2, L, D, generator=g).to(ctx.device) for _ in range(W)]
        targets = [torch.randn(2, L, D, generator=g).to(ctx.device) for _ in range(W)]
        out, aux_loss = model(xs[r])
        (((out - targets[r]) ** 2).mean() + aux_loss).backward()
        ep.sync_gradients(model, ctx)
        ep.clip_grad_norm_(model, 0.5, ctx)
        opt.step()
        opt.zero_grad()
        losses = [((o - t) ** 2).mean() + a for (o, a), t in
                  ((ref(x), t) for x, t in zip(xs, targets, strict=True))]
        (sum(losses) / W).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad()
    full = {f"proj.{k}": v for k, v in model.proj.state_dict().items()}
    for layer in ("moe1", "moe2"):
        full.update({f"{layer}.{k}": v for k, v in getattr(model, layer).full_state_dict().items()})
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f"after {steps} steps, {key}: {m}")


def check_wrong_nodes_refused(ctx: ep.DistContext) -> None:
    """Under two torchrun agents of 2 ranks (GROUP_RANK 0, 0, 1, 1): a layout of 4 ranks per node
    whose LOCAL_WORLD_SIZE some ranks misreport is refused on every rank, before any exchange."""
    import os
    if os.environ.get("GROUP_RANK") is None or int(os.environ["LOCAL_WORLD_SIZE"]) != 2:
        return
    saved = os.environ["LOCAL_WORLD_SIZE"]
    os.environ["LOCAL_WORLD_SIZE"] = "4"  # one node of 4, but the agents say two nodes
    try:
        torch.manual_seed(0)
        ep.MoE(ep.MoEConfig(d_model=D, d_ff=F, num_experts=E, exchange="hierarchical"), ep_group=ctx.ep_group)
        raise AssertionError("ranks of different nodes put on one node were accepted")
    except ValueError as err:
        assert "GROUP_RANK" in str(err), err
    finally:
        os.environ["LOCAL_WORLD_SIZE"] = saved


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ep-size", type=int, required=True)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--random", type=int, default=0, help="add N seeded random configurations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launcher", default="torchrun", help="the launcher this run expects")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--local_rank", type=int, default=None)  # the DeepSpeed launcher passes it
    parser.add_argument("--exchange", default="flat", choices=("flat", "hierarchical"))
    parser.add_argument("--ranks-per-node", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="the layer under torch.compile")
    args = parser.parse_args()
    LAYOUT.update(exchange=args.exchange, ranks_per_node=args.ranks_per_node, compile=args.compile)
    torch._inductor.config.fallback_random = True  # compiled noise draws what eager draws
    ctx = ep.init_distributed(ep_size=args.ep_size, backend=args.backend, timeout=120)
    assert ctx.launcher == args.launcher and ctx.backend == args.backend, (ctx.launcher, ctx.backend)
    assert ctx.world_size == ctx.ep_size * ctx.dp_size
    if ctx.ep_size > 1:
        try:
            bad = ep.MoEConfig(d_model=D, d_ff=F, num_experts=ctx.ep_size + 1, top_k=1)
            ep.MoE(bad, ep_group=ctx.ep_group)
            raise AssertionError("num_experts not divisible by ep_size was accepted")
        except ValueError as err:
            assert "num_experts" in str(err)
    if args.exchange == "hierarchical" and ctx.ep_size == 4:
        try:  # 3 ranks per node split a group of 4 ranks 3 + 1
            torch.manual_seed(0)
            ep.MoE(ep.MoEConfig(d_model=D, d_ff=F, num_experts=E, exchange="hierarchical"),
                   ep_group=ctx.ep_group, ranks_per_node=3)
            raise AssertionError("an expert-parallel group spanning nodes unevenly was accepted")
        except ValueError as err:
            assert "hierarchical" in str(err) and "ranks per node" in str(err), err
    if args.exchange == "hierarchical" and args.ranks_per_node is None and ctx.world_size == 4:
        check_wrong_nodes_refused(ctx)
    extra = random_cases(args.random, args.seed)
    CASES.update(extra)
    for name in [*args.cases, *extra]:
        run_case(ctx, name)
        if ctx.rank == 0:
            print(f"ok {name}", flush=True)
    train_steps(ctx)
    if ctx.rank == 0:
        done = len(args.cases) + len(extra) + 1
        print(f"ALL OK {done} under {ctx.launcher} with {ctx.world_size} ranks", flush=True)
    ep.shutdown(ctx)  # ends a launched process at once (docs/reliability.md, "Ending a job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
