"""A deliberately plain, slow oracle that follows API.md literally: loops over groups, tokens, choices.

It reads the parameters of an ``ep.MoE`` and recomputes the layer with Python loops and per-token
vector operations, sharing no code with the package beyond torch itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def clamped_swiglu(cfg, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """gpt-oss's gated activation, element by element: the gate capped at +limit, the up projection
    clipped to [-limit, limit], then gate * sigmoid(alpha * gate) * (up + 1)."""
    limit, alpha = cfg.swiglu_limit, cfg.swiglu_alpha
    out = []
    for gi, hi in zip(g, h, strict=True):
        gi = gi if gi <= limit else gi * 0 + limit
        hi = hi if -limit <= hi <= limit else hi * 0 + (limit if hi > 0 else -limit)
        out.append(gi / (1 + torch.exp(-alpha * gi)) * (hi + 1))
    return torch.stack(out)


def expert_forward(moe, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert e on one token vector, straight from the formulas of API.md."""
    ex = moe.experts
    act = moe.cfg.activation
    h = x_D @ ex.w_in[e] + (ex.b_in[e] if moe.cfg.bias else 0)
    if act == "clamped_swiglu":
        h = clamped_swiglu(moe.cfg, x_D @ ex.w_gate[e] + (ex.b_gate[e] if moe.cfg.bias else 0), h)
    elif act in ("swiglu", "geglu"):
        g = x_D @ ex.w_gate[e] + (ex.b_gate[e] if moe.cfg.bias else 0)
        g = F.silu(g) if act == "swiglu" else 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
        h = g * h
    elif act == "relu":
        h = torch.clamp(h, min=0)
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ ex.w_out[e] + (ex.b_out[e] if moe.cfg.bias else 0)


def oracle_group_size(cfg, B: int, L: int) -> int:
    if cfg.group_size is not None:
        return cfg.group_size
    if cfg.examples_per_group is not None:
        return round(cfg.examples_per_group * L)
    return B * L


def oracle_capacity(cfg, S: int, training: bool):
    if cfg.expert_capacity is not None:
        return cfg.expert_capacity
    factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    if factor is None:
        return None
    return max(cfg.min_capacity, math.ceil(round(factor * S * cfg.top_k / cfg.num_experts, 9)))


def shared_forward(moe, x_D: torch.Tensor) -> torch.Tensor:
    """The shared experts (always on) of API.md on one token, or 0 without them."""
    cfg = moe.cfg
    if not cfg.num_shared_experts:
        return torch.zeros_like(x_D)
    sh = moe.shared_experts
    h = x_D @ sh.w_in + (sh.b_in if cfg.bias else 0)
    if cfg.activation == "clamped_swiglu":
        h = clamped_swiglu(cfg, x_D @ sh.w_gate + (sh.b_gate if cfg.bias else 0), h)
    elif cfg.activation in ("swiglu", "geglu"):
        g = x_D @ sh.w_gate + (sh.b_gate if cfg.bias else 0)
        g = F.silu(g) if cfg.activation == "swiglu" else 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
        h = g * h
    elif cfg.activation == "relu":
        h = torch.clamp(h, min=0)
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    y = h @ sh.w_out + (sh.b_out if cfg.bias else 0)
    if cfg.shared_expert_gate:
        y = y * torch.sigmoid(x_D @ moe.shared_gate.weight[0])
    return y


def oracle_choices(cfg, scores_E: torch.Tensor, bias_E):
    """One token's K experts, best first, as API.md says: selection by score + bias, restricted to the
    best num_limited_groups groups (group score: the sum of its top-2 biased scores, top-1 for a
    group of one expert); ties go to the lower group / expert id."""
    E, K = cfg.num_experts, cfg.top_k
    sel = [scores_E[e].item() + (bias_E[e].item() if bias_E is not None else 0.0) for e in range(E)]
    allowed = list(range(E))
    if cfg.num_expert_groups is not None:
        per = E // cfg.num_expert_groups
        group_scores = []
        for g in range(cfg.num_expert_groups):
            inside = sorted((sel[e] for e in range(g * per, (g + 1) * per)), reverse=True)
            group_scores.append(sum(inside[:min(2, per)]))
        kept = sorted(range(cfg.num_expert_groups), key=lambda g: -group_scores[g])[:cfg.num_limited_groups]
        allowed = [e for e in range(E) if e // per in kept]
    return sorted(allowed, key=lambda e: -sel[e])[:K]


def oracle_topk_moe(moe, x_BLD: torch.Tensor, training: bool, noise_GSE=None, jitter_GSD=None):
    """Returns (y_BLD, aux dict) of top-k / noisy top-k routing computed with loops.

    noise_GSE: the standard normal draws of noisy_topk (training only); jitter_GSD: the uniform
    multipliers of router_jitter (training only).
    """
    cfg = moe.cfg
    B, L, D = x_BLD.shape
    E, K = cfg.num_experts, cfg.top_k
    S = oracle_group_size(cfg, B, L)
    G = B * L // S
    C = oracle_capacity(cfg, S, training)
    x_TD = x_BLD.reshape(B * L, D)
    W = moe.router.weight.to(cfg.router_dtype)
    b = moe.router.bias.to(cfg.router_dtype) if cfg.router_bias else 0  # gpt-oss's router bias
    bias_E = getattr(moe.router, "expert_bias", None)
    outputs = []
    balance, zs, ents, counts, dropped = [], [], [], [0] * E, 0
    all_choices, all_norm = [], []  # per token: its K experts, its normalised scores
    for g in range(G):
        xs = x_TD[g * S:(g + 1) * S]
        xr = xs.to(cfg.router_dtype)
        if jitter_GSD is not None:
            xr = xr * jitter_GSD[g]
        logits = xr @ W.T + b
        if noise_GSE is not None:
            std = F.softplus(xr @ moe.router.noise.weight.to(cfg.router_dtype).T)
            logits = logits + noise_GSE[g] * std
        if cfg.score_func == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            scores = probs = torch.softmax(logits, -1)
        choices = []  # choices[s] = list of (expert, gate)
        for s in range(S):
            order = oracle_choices(cfg, scores[s], bias_E)
            gates = [scores[s, e] for e in order]
            if cfg.normalize_topk:
                total = sum(gates)
                gates = [gt / total for gt in gates]
            gates = [gt * cfg.route_scale for gt in gates]
            choices.append(list(zip(order, gates, strict=True)))
            all_choices.append(order)
            all_norm.append(probs[s])
        priority = [(s, k) for k in range(K) for s in range(S)]
        if cfg.drop_policy == "probs":
            priority = sorted(priority, key=lambda sk: -probs[sk[0], choices[sk[0]][sk[1]][0]].item())
        fill = [0] * E
        y_rows = [shared_forward(moe, xs[s]).to(x_BLD.dtype) for s in range(S)]
        for s, k in priority:
            e, gate = choices[s][k]
            if C is None or fill[e] < C:
                fill[e] += 1
                y_rows[s] = y_rows[s] + gate.to(x_BLD.dtype) * expert_forward(moe, e, xs[s])
            else:
                dropped += 1
        for e in range(E):
            counts[e] += fill[e]
        outputs.extend(y_rows)
        f = [sum(1 for s in range(S) for e2, _ in choices[s] if e2 == e) / (S * K)
             for e in range(E)]
        P = probs.mean(0)
        balance.append(E * sum(f[e] * P[e] for e in range(E)))
        zs.extend(torch.logsumexp(logits[s], 0) ** 2 for s in range(S))
        ents.extend(-(torch.softmax(logits[s], 0) * torch.log_softmax(logits[s], 0)).sum() for s in range(S))
    seq, selected = _sequence_balance(cfg, all_choices, all_norm, B, L)
    aux = {
        "load_balance_loss": sum(balance) / G,
        "z_loss": sum(zs) / len(zs),
        "router_entropy": sum(ents) / len(ents),
        "dropped_fraction": dropped / (G * S * K),
        "expert_counts": torch.tensor(counts),
        "seq_balance_loss": seq,
        "max_violation": max(selected) / (sum(selected) / E) - 1 if sum(selected) else 0.0,
    }
    aux["loss"] = (cfg.load_balance_coef * aux["load_balance_loss"] + cfg.z_loss_coef * aux["z_loss"]
                   + cfg.seq_aux_loss_coef * seq)
    return torch.stack(outputs).reshape(B, L, D), aux


def _sequence_balance(cfg, all_choices, all_norm, B: int, L: int):
    """DeepSeek-V3's sequence-wise balance loss (mean over sequences of Σ_i f_i P_i, f_i = E/(K·L) ·
    tokens that selected i, P_i = mean normalised score) and the selected assignments per expert."""
    E, K = cfg.num_experts, cfg.top_k
    losses, selected = [], [0] * E
    for b in range(B):
        tokens = range(b * L, (b + 1) * L)
        f = [E / (K * L) * sum(1 for t in tokens if i in all_choices[t]) for i in range(E)]
        P = [sum(all_norm[t][i] for t in tokens) / L for i in range(E)]
        losses.append(sum(f[i] * P[i] for i in range(E)))
        for t in tokens:
            for i in all_choices[t]:
                selected[i] += 1
    return sum(losses) / B, selected


def _group_logits(moe, xs, jitter_SD=None):
    xr = xs.to(moe.cfg.router_dtype)
    if jitter_SD is not None:
        xr = xr * jitter_SD
    b = moe.router.bias.to(moe.cfg.router_dtype) if moe.cfg.router_bias else 0
    return xr @ moe.router.weight.to(moe.cfg.router_dtype).T + b


def _common_aux(cfg, all_logits, balance, dropped, counts):
    zs = [torch.logsumexp(row, 0) ** 2 for logits in all_logits for row in logits]
    ents = [-(torch.softmax(row, 0) * torch.log_softmax(row, 0)).sum()
            for logits in all_logits for row in logits]
    aux = {"load_balance_loss": balance, "z_loss": sum(zs) / len(zs),
           "router_entropy": sum(ents) / len(ents), "dropped_fraction": dropped,
           "expert_counts": torch.tensor(counts), "seq_balance_loss": 0.0, "max_violation": 0.0}
    aux["loss"] = cfg.load_balance_coef * balance + cfg.z_loss_coef * aux["z_loss"]
    return aux


def oracle_expert_choice_moe(moe, x_BLD: torch.Tensor, training: bool):
    """Expert choice (Zhou et al. 2022) with loops: each expert takes its top-C tokens per group."""
    cfg = moe.cfg
    B, L, D = x_BLD.shape
    E = cfg.num_experts
    S = oracle_group_size(cfg, B, L)
    G = B * L // S
    if cfg.expert_capacity is not None:
        C = cfg.expert_capacity
    else:
        factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
        C = max(cfg.min_capacity, math.ceil(round(factor * S / E, 9)))
    C = min(C, S)
    x_TD = x_BLD.reshape(B * L, D)
    outputs, all_logits, untaken = [], [], 0
    for g in range(G):
        xs = x_TD[g * S:(g + 1) * S]
        logits = _group_logits(moe, xs)
        all_logits.append(logits)
        probs = torch.softmax(logits, -1)
        y_rows = [shared_forward(moe, xs[s]).to(x_BLD.dtype) for s in range(S)]
        taken = [False] * S
        for e in range(E):
            chosen = sorted(range(S), key=lambda s, e=e: -probs[s, e].item())[:C]
            for s in chosen:
                y_rows[s] = y_rows[s] + probs[s, e].to(x_BLD.dtype) * expert_forward(moe, e, xs[s])
                taken[s] = True
        untaken += taken.count(False)
        outputs.extend(y_rows)
    aux = _common_aux(cfg, all_logits, 0.0, untaken / (G * S), [G * C] * E)
    return torch.stack(outputs).reshape(B, L, D), aux


def oracle_soft_moe(moe, x_BLD: torch.Tensor):
    """Soft MoE (Puigcerver et al. 2024) with loops over slots and tokens."""
    cfg = moe.cfg
    B, L, D = x_BLD.shape
    E, P = cfg.num_experts, cfg.slots_per_expert
    S = oracle_group_size(cfg, B, L)
    G = B * L // S
    x_TD = x_BLD.reshape(B * L, D)
    outputs, all_logits = [], []
    for g in range(G):
        xs = x_TD[g * S:(g + 1) * S]
        logits = _group_logits(moe, xs)  # [S, E*P]
        all_logits.append(logits)
        slot_out = []
        for j in range(E * P):
            w = torch.softmax(logits[:, j], 0)  # over the group's tokens
            slot = sum(w[s].to(x_BLD.dtype) * xs[s] for s in range(S))
            slot_out.append(expert_forward(moe, j // P, slot))
        for s in range(S):
            c = torch.softmax(logits[s], 0)  # over all slots
            outputs.append(sum(c[j].to(x_BLD.dtype) * slot_out[j] for j in range(E * P))
                           + shared_forward(moe, xs[s]).to(x_BLD.dtype))
    aux = _common_aux(cfg, all_logits, 0.0, 0.0, [G * P] * E)
    return torch.stack(outputs).reshape(B, L, D), aux


def oracle_kept_assignments(idx_GSK: torch.Tensor, probs_GSE: torch.Tensor, capacity, drop_policy: str):
    """Which (token, expert) assignments survive capacity, with loops: returns (kept set, counts [E]).

    Tokens are numbered over all groups (t = g * S + s). Assignments are visited in API.md's priority
    order (position: all first choices in token order, then all second choices, ...; probs: highest
    router probability first, ties in position order); an assignment is kept while its expert has
    fewer than ``capacity`` kept assignments in the group (None: all kept).
    """
    G, S, K = idx_GSK.shape
    E = probs_GSE.shape[-1]
    kept, counts = set(), [0] * E
    for g in range(G):
        priority = [(s, k) for k in range(K) for s in range(S)]
        if drop_policy == "probs":
            priority = sorted(priority, key=lambda sk: -probs_GSE[g, sk[0], idx_GSK[g, sk[0], sk[1]]].item())
        fill = [0] * E
        for s, k in priority:
            e = int(idx_GSK[g, s, k])
            if capacity is None or fill[e] < capacity:
                fill[e] += 1
                kept.add((g * S + s, e))
        counts = [c + f for c, f in zip(counts, fill, strict=True)]
    return kept, torch.tensor(counts)
