"""Routers and routing arithmetic: groups, capacity, top-k gates. Math only, no communication.

All routing math runs in ``router_dtype`` (float32 by default) whatever the activation dtype.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig, to_dtype
from .precision import autocast_off


class TopKOutput(NamedTuple):
    """What a token-choice router returns for input x [..., D]."""

    gates: Tensor
    """[..., K] gate weights (sum to 1 per token when normalize_topk)."""
    indices: Tensor
    """[..., K] int64 expert ids in [0, E), best first."""
    probs: Tensor
    """[..., E] the full router probabilities."""


def topk_from_logits(logits_XE: Tensor, top_k: int, normalize: bool, *, score_func: str = "softmax",
                     bias_E: Tensor | None = None, groups: tuple[int, int] | None = None,
                     route_scale: float = 1.0) -> TopKOutput:
    """Each token's K experts and gates from the router logits (docs/routing.md).

    1. Scores: softmax over experts, or a sigmoid per expert (``score_func``).
    2. Selection scores: the scores plus ``bias_E`` (aux-loss-free balancing; selection only),
       restricted to each token's best ``M`` of ``G`` expert groups when ``groups = (G, M)``.
    3. The K largest selection scores (a stable sort: ties go to the lower expert id, always).
    4. Gates: the unbiased scores of those experts, divided by their sum if ``normalize``, times
       ``route_scale``.

    ``probs`` are the scores normalised to sum to 1 (the softmax itself, or s / Σ s for sigmoid):
    what the balance losses and the "probs" drop policy read.
    """
    if score_func == "sigmoid":
        scores_XE = torch.sigmoid(logits_XE)
        probs_XE = scores_XE / scores_XE.sum(dim=-1, keepdim=True)
    else:
        scores_XE = probs_XE = torch.softmax(logits_XE, dim=-1)
    select_XE = scores_XE if bias_E is None else scores_XE.detach() + bias_E.to(scores_XE.dtype)
    if groups is not None:
        select_XE = limit_to_groups(select_XE, *groups)
    idx_XK = torch.sort(select_XE, dim=-1, descending=True, stable=True).indices[..., :top_k]
    gates_XK = scores_XE.gather(-1, idx_XK)
    if normalize:
        gates_XK = gates_XK / gates_XK.sum(dim=-1, keepdim=True)
    if route_scale != 1.0:
        gates_XK = gates_XK * route_scale
    return TopKOutput(gates_XK, idx_XK, probs_XE)


def limit_to_groups(select_XE: Tensor, num_groups: int, num_limited: int) -> Tensor:
    """Selection scores with every expert outside the token's best ``num_limited`` groups at -inf.

    The E experts form ``num_groups`` contiguous groups; a group's score is the sum of its two
    largest selection scores (its largest, for a group of one expert); ties go to the lower group.
    """
    E = select_XE.shape[-1]
    per = E // num_groups
    grouped = select_XE.reshape(*select_XE.shape[:-1], num_groups, per)
    group_score = torch.sort(grouped, dim=-1, descending=True).values[..., :min(2, per)].sum(dim=-1)
    best = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[..., :num_limited]
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, best, True)
    return select_XE.masked_fill(~keep.repeat_interleave(per, dim=-1), float("-inf"))


class Router(nn.Module):
    """Base of every router: ``weight`` [outputs, D] (and with ``bias`` a learned ``bias`` [outputs],
    zero at first) and the logits ``x @ weight.T + bias``, with optional input jitter.

    In training the router input is multiplied by U(1 - jitter, 1 + jitter). Logits are computed in
    ``router_dtype`` whatever the dtype of x or of the weight.
    """

    bias: nn.Parameter | None

    def __init__(self, d_model: int, num_outputs: int, *, jitter: float = 0.0,
                 router_dtype: torch.dtype | str = torch.float32,
                 dtype: torch.dtype | str = torch.float32, bias: bool = False) -> None:
        super().__init__()
        self.jitter = jitter
        self.router_dtype = to_dtype("router_dtype", router_dtype)
        self.weight = nn.Parameter(torch.empty(num_outputs, d_model, dtype=to_dtype("dtype", dtype)))
        self.bias = nn.Parameter(torch.empty(num_outputs, dtype=self.weight.dtype)) if bias else None
        Router._fill(self)

    @torch.no_grad()
    def _fill(self) -> None:
        """weight ~ N(0, 0.02²) drawn in fp32 on its device (that device's generator), bias zero."""
        self.weight.copy_(torch.randn(self.weight.shape, device=self.weight.device) * 0.02)
        if self.bias is not None:
            self.bias.zero_()

    def reset_parameters(self) -> None:
        """Initialises in place, drawing from torch's generators as the constructor did."""
        Router._fill(self)

    def router_input(self, x_XD: Tensor) -> Tensor:
        """x in router_dtype, multiplied by the jitter noise in training."""
        x_XD = x_XD.to(self.router_dtype)
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_XD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_XD = x_XD * noise
        return x_XD

    def _bias(self) -> Tensor | None:
        return None if self.bias is None else self.bias.to(self.router_dtype)

    def logits(self, x_XD: Tensor) -> Tensor:
        """Routing logits [..., outputs] in router_dtype (also under autocast, which is off here)."""
        with autocast_off(x_XD.device):
            return F.linear(self.router_input(x_XD), self.weight.to(self.router_dtype), self._bias())


class TopKRouter(Router):
    """Top-k router: softmax (Switch routing for K=1) or sigmoid scores. ``weight`` is [E, D].

    Called on x [..., D] it returns :class:`TopKOutput` (gates [..., K], indices [..., K],
    probs [..., E]). In training the router input is multiplied by U(1 - jitter, 1 + jitter).
    With ``bias_update_rate`` set it holds ``expert_bias`` [E] (fp32, persistent, added to the scores
    for the selection only; ``ep.update_expert_bias`` moves it by that rate) and ``expert_load`` [E]
    (selected assignments of training forwards since the last update; not in the state dict).
    ``expert_groups = (G, M)`` limits each token to its best M of G contiguous expert groups.
    With ``bias`` the logits get a learned ``bias`` [E] (gpt-oss's router), which, unlike
    ``expert_bias``, also moves the gates.
    """

    expert_bias: Tensor | None
    expert_load: Tensor | None

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *,
                 normalize_topk: bool = True, jitter: float = 0.0,
                 router_dtype: torch.dtype | str = torch.float32,
                 dtype: torch.dtype | str = torch.float32, score_func: str = "softmax",
                 route_scale: float = 1.0, bias_update_rate: float | None = None,
                 expert_groups: tuple[int, int] | None = None, bias: bool = False) -> None:
        # Validation of the shared fields lives in one place: MoEConfig.
        G, M = expert_groups if expert_groups is not None else (None, None)
        MoEConfig(d_model=d_model, d_ff=1, num_experts=num_experts, top_k=top_k,
                  normalize_topk=normalize_topk, router_jitter=jitter, score_func=score_func,
                  route_scale=route_scale, bias_update_rate=bias_update_rate, num_expert_groups=G,
                  num_limited_groups=M, router_bias=bias)
        super().__init__(d_model, num_experts, jitter=jitter, router_dtype=router_dtype, dtype=dtype,
                         bias=bias)
        self.num_experts, self.top_k, self.normalize_topk = num_experts, top_k, normalize_topk
        self.score_func, self.route_scale, self.expert_groups = score_func, route_scale, expert_groups
        self.bias_update_rate = bias_update_rate
        balanced = bias_update_rate is not None
        self.register_buffer("expert_bias", torch.zeros(num_experts) if balanced else None)
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64) if balanced
                             else None, persistent=False)

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> TopKRouter:
        """The router of an MoE layer built from ``cfg``."""
        groups = None
        if cfg.num_expert_groups is not None and cfg.num_limited_groups is not None:
            groups = (cfg.num_expert_groups, cfg.num_limited_groups)
        return cls(cfg.d_model, cfg.num_experts, cfg.top_k, normalize_topk=cfg.normalize_topk,
                   jitter=cfg.router_jitter, router_dtype=cfg.router_dtype, dtype=cfg.dtype,
                   score_func=cfg.score_func, route_scale=cfg.route_scale,
                   bias_update_rate=cfg.bias_update_rate, expert_groups=groups, bias=cfg.router_bias)

    def route(self, logits_XE: Tensor) -> TopKOutput:
        """Experts and gates from logits [..., E] (:func:`topk_from_logits` with this router's options)."""
        return topk_from_logits(logits_XE, self.top_k, self.normalize_topk, score_func=self.score_func,
                                bias_E=self.expert_bias, groups=self.expert_groups,
                                route_scale=self.route_scale)

    def forward(self, x_XD: Tensor) -> TopKOutput:
        """Routes x [..., D]: gates [..., K], indices [..., K], probs [..., E]."""
        return self.route(self.logits(x_XD))

    def reset_parameters(self) -> None:
        """The weight as the constructor draws it; the expert bias and the counts zero."""
        super().reset_parameters()
        for buffer in (self.expert_bias, self.expert_load):
            if buffer is not None:
                buffer.zero_()

    def _apply(self, fn: Any, recurse: bool = True) -> TopKRouter:
        # expert_bias stays fp32 whatever the model's dtype: .to(bfloat16) moves it, never casts it.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None:
            device = fn(bias[:0]).device  # a meta bias has no values to move (to_empty)
            self.expert_bias = torch.empty_like(bias, device=device) if bias.is_meta else bias.to(device)
        return self


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017): in training the logits get
    ``randn * softplus(x @ noise.weight.T)``; in eval it is exactly :class:`TopKRouter`.
    ``noise.weight`` is [E, D], initialised to zero as in the paper.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, **kwargs: object) -> None:
        super().__init__(d_model, num_experts, top_k, **kwargs)  # type: ignore[arg-type]
        self.noise = nn.Linear(d_model, num_experts, bias=False, dtype=self.weight.dtype)
        nn.init.zeros_(self.noise.weight)

    def reset_parameters(self) -> None:
        """As the constructor: the weight drawn, then the noise projection's (drawn, then zeroed)."""
        super().reset_parameters()
        self.noise.reset_parameters()
        nn.init.zeros_(self.noise.weight)

    def logits(self, x_XD: Tensor) -> Tensor:
        """Routing logits, with the learned noise added in training (router_dtype, autocast off)."""
        with autocast_off(x_XD.device):
            x_XD = self.router_input(x_XD)
            logits_XE = F.linear(x_XD, self.weight.to(self.router_dtype), self._bias())
            if self.training:
                std_XE = F.softplus(F.linear(x_XD, self.noise.weight.to(self.router_dtype)))
                logits_XE = logits_XE + torch.randn_like(logits_XE) * std_XE
            return logits_XE


class ExpertChoiceOutput(NamedTuple):
    """What :class:`ExpertChoiceRouter` returns for x [G, S, D] (each leading row a group)."""

    token_indices: Tensor
    """[G, E, C] int64: the tokens s of the group that expert e takes, highest probability first."""
    weights: Tensor
    """[G, E, C] probs[s, e] of those tokens: the combine weights."""
    probs: Tensor
    """[G, S, E] the router probabilities (softmax over experts)."""


def expert_choice_from_logits(logits_GSE: Tensor, capacity: int) -> ExpertChoiceOutput:
    """Each expert takes the ``min(capacity, S)`` tokens of the group with the largest probs[:, e]."""
    probs_GSE = torch.softmax(logits_GSE, dim=-1)
    taken = min(capacity, probs_GSE.shape[1])
    # A stable sort rather than topk: among equal probabilities the earlier token wins, always.
    weights_GES, tokens_GES = torch.sort(probs_GSE.transpose(1, 2), dim=-1, descending=True, stable=True)
    weights_GEC, tokens_GEC = weights_GES[..., :taken], tokens_GES[..., :taken]
    return ExpertChoiceOutput(tokens_GEC, weights_GEC, probs_GSE)


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): every expert takes its top-C tokens of each group.

    ``weight`` is [E, D]. C = max(min_capacity, ceil(capacity_factor * S / E)) (eval_capacity_factor
    in eval mode, or expert_capacity), capped at S. Called on x [G, S, D], each leading row one group,
    it returns :class:`ExpertChoiceOutput`.
    """

    def __init__(self, d_model: int, num_experts: int, *, capacity_factor: float | None = 1.25,
                 eval_capacity_factor: float | None = 2.0, expert_capacity: int | None = None,
                 min_capacity: int = 4, jitter: float = 0.0,
                 router_dtype: torch.dtype | str = torch.float32,
                 dtype: torch.dtype | str = torch.float32, bias: bool = False) -> None:
        self.cfg = MoEConfig(d_model=d_model, d_ff=1, num_experts=num_experts, top_k=1,
                             router="expert_choice", capacity_factor=capacity_factor,
                             eval_capacity_factor=eval_capacity_factor, expert_capacity=expert_capacity,
                             min_capacity=min_capacity, router_jitter=jitter, router_bias=bias)
        super().__init__(d_model, num_experts, jitter=jitter, router_dtype=router_dtype, dtype=dtype,
                         bias=bias)

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> ExpertChoiceRouter:
        """The router of an MoE layer built from ``cfg``."""
        return cls(cfg.d_model, cfg.num_experts, capacity_factor=cfg.capacity_factor,
                   eval_capacity_factor=cfg.eval_capacity_factor,
                   expert_capacity=cfg.expert_capacity, min_capacity=cfg.min_capacity,
                   jitter=cfg.router_jitter, router_dtype=cfg.router_dtype, dtype=cfg.dtype,
                   bias=cfg.router_bias)

    def capacity(self, tokens_per_group: int) -> int:
        """C for groups of S tokens in the current mode (before the cap at S)."""
        C = capacity(self.cfg, tokens_per_group, self.training)
        if C is None:  # unreachable: MoEConfig rejects dropless expert choice
            raise ValueError("expert_choice routing needs a capacity")
        return C

    def forward(self, x_GSD: Tensor) -> ExpertChoiceOutput:
        """Routes groups x [G, S, D]: token indices and weights [G, E, C], probs [G, S, E]."""
        return expert_choice_from_logits(self.logits(x_GSD), self.capacity(x_GSD.shape[-2]))


class SoftOutput(NamedTuple):
    """What :class:`SoftRouter` returns for x [G, S, D]; J = E * slots_per_expert slots per group."""

    dispatch: Tensor
    """[G, S, J] softmax over the group's tokens: slot j = sum_s dispatch[s, j] * x_s."""
    combine: Tensor
    """[G, S, J] softmax over the slots: y_s = sum_j combine[s, j] * expert_out_j."""
    logits: Tensor
    """[G, S, J] the router logits."""


def soft_from_logits(logits_GSJ: Tensor) -> SoftOutput:
    """Soft MoE weights: dispatch normalised over tokens, combine normalised over slots."""
    return SoftOutput(torch.softmax(logits_GSJ, dim=1), torch.softmax(logits_GSJ, dim=2), logits_GSJ)


class SoftRouter(Router):
    """Soft MoE routing (Puigcerver et al. 2024). ``weight`` is [E * slots_per_expert, D].

    Slot j belongs to expert j // slots_per_expert. Called on x [G, S, D], each leading row one group,
    it returns :class:`SoftOutput`. Nothing is dropped.
    """

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int = 1, *,
                 jitter: float = 0.0, router_dtype: torch.dtype | str = torch.float32,
                 dtype: torch.dtype | str = torch.float32, bias: bool = False) -> None:
        MoEConfig(d_model=d_model, d_ff=1, num_experts=num_experts, top_k=1, router="soft",
                  slots_per_expert=slots_per_expert, router_jitter=jitter, router_bias=bias)
        super().__init__(d_model, num_experts * slots_per_expert, jitter=jitter,
                         router_dtype=router_dtype, dtype=dtype, bias=bias)
        self.num_experts, self.slots_per_expert = num_experts, slots_per_expert

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> SoftRouter:
        """The router of an MoE layer built from ``cfg``."""
        return cls(cfg.d_model, cfg.num_experts, cfg.slots_per_expert, jitter=cfg.router_jitter,
                   router_dtype=cfg.router_dtype, dtype=cfg.dtype, bias=cfg.router_bias)

    def forward(self, x_GSD: Tensor) -> SoftOutput:
        """Routes groups x [G, S, D]: dispatch and combine weights [G, S, J]."""
        return soft_from_logits(self.logits(x_GSD))


def group_size(cfg: MoEConfig, batch: int, seq_len: int) -> int:
    """S, the tokens per routing group for a local batch [B, L]; ValueError if it does not divide."""
    tokens = batch * seq_len
    if cfg.group_size is not None:
        size = cfg.group_size
        if tokens % size:
            raise ValueError(f"MoEConfig.group_size={size} does not divide the local tokens "
                             f"B*L={batch}*{seq_len}={tokens}")
        return size
    if cfg.examples_per_group is not None:
        epg = cfg.examples_per_group
        exact = epg * seq_len
        size = round(exact)
        if size < 1 or abs(exact - size) > 1e-9 or tokens % size:
            raise ValueError(f"MoEConfig.examples_per_group={epg} gives {exact} tokens per group, "
                             f"which must be a whole number dividing B*L={batch}*{seq_len}={tokens}")
        return size
    return max(tokens, 1)


def capacity(cfg: MoEConfig, tokens_per_group: int, training: bool) -> int | None:
    """C, slots per expert per group, or None when dropless.

    Token choice: ``max(min_capacity, ceil(factor * S * K / E))``; expert choice:
    ``max(min_capacity, ceil(factor * S / E))``; ``expert_capacity`` overrides both.
    """
    if cfg.expert_capacity is not None:
        return cfg.expert_capacity
    factor = cfg.capacity_factor_for(training)
    if factor is None:
        return None
    k = cfg.top_k if cfg.token_choice else 1
    # The 1e-9 keeps float noise (1.1 * 10 = 11.000000000000002) from adding a slot.
    return max(cfg.min_capacity, math.ceil(factor * tokens_per_group * k / cfg.num_experts - 1e-9))


def make_router(cfg: MoEConfig) -> Router:
    """The router module named by ``cfg.router``."""
    routers: dict[str, type[TopKRouter] | type[ExpertChoiceRouter] | type[SoftRouter]] = {
        "topk": TopKRouter, "noisy_topk": NoisyTopKRouter,
        "expert_choice": ExpertChoiceRouter, "soft": SoftRouter}
    return routers[cfg.router].from_config(cfg)


TOKEN_MIXING_ROUTERS = ("expert_choice", "soft")


def check_causal_routing(cfg: MoEConfig, *, per_position_groups: bool = False) -> None:
    """Raises ValueError if ``cfg`` would leak future tokens into a causal (decoder) model.

    Expert-choice and soft routing decide each token's output from all tokens of its routing group
    (which tokens an expert takes; how slots are mixed), so when a group spans several positions of a
    sequence, a token's output depends on later tokens. That is safe for encoders, and for decoders
    only with per-position groups: call the layer on position-major tokens (``x_BLD.transpose(0, 1)``)
    with ``group_size`` dividing B, so each group holds tokens of one position (docs/routing.md).
    """
    if cfg.router in TOKEN_MIXING_ROUTERS and not per_position_groups:
        raise ValueError(
            f"MoEConfig.router={cfg.router!r} mixes the tokens of a routing group, which leaks future "
            "tokens into a causal model; use router='topk' or 'noisy_topk', use it in an encoder, or "
            "route per-position groups (position-major input with group_size dividing the batch)")
