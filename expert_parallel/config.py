"""MoEConfig: the one validated configuration of an MoE layer.

Every field is a plain value; process groups are passed to the modules separately. Each bad value
raises ``ValueError`` naming the field and the accepted values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

ROUTERS = ("topk", "noisy_topk", "expert_choice", "soft")
TOKEN_CHOICE_ROUTERS = ("topk", "noisy_topk")
ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu", "clamped_swiglu")
GATED_ACTIVATIONS = ("swiglu", "geglu", "clamped_swiglu")
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # gpt-oss's clamped SwiGLU: sigmoid slope, clamp bound
DROP_POLICIES = ("position", "probs")
SCORE_FUNCS = ("softmax", "sigmoid")
EXCHANGES = ("flat", "hierarchical")
_DTYPES = {"float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "float16": torch.float16}


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"MoEConfig.{name}={value!r} is invalid: {allowed}")


def to_dtype(name: str, value: Any) -> torch.dtype:
    """Accepts a floating torch.dtype or its name ("bfloat16"); raises ValueError otherwise."""
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    raise _fail(name, value, f"expected one of {sorted(_DTYPES)} or the matching torch.dtype")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one Mixture-of-Experts layer (see docs/routing.md for the formulas)."""

    d_model: int
    """D, the model (token) dimension."""
    d_ff: int
    """F, the hidden width of each expert."""
    num_experts: int
    """E, the number of experts (global, over all expert-parallel ranks)."""
    top_k: int = 2
    """K, experts per token for the token-choice routers; 1 <= K <= E."""
    router: str = "topk"
    """One of "topk", "noisy_topk", "expert_choice", "soft"."""
    capacity_factor: float | None = 1.25
    """Training capacity factor; None means dropless (topk / noisy_topk only)."""
    eval_capacity_factor: float | None = 2.0
    """Capacity factor used when module.training is False; None means dropless."""
    expert_capacity: int | None = None
    """Fixed capacity C per expert per group; overrides both factors."""
    min_capacity: int = 4
    """Lower bound on a computed capacity C."""
    drop_policy: str = "position"
    """Which assignments win a full expert: "position" (first choices first, token order) or "probs"."""
    group_size: int | None = None
    """S, tokens per routing group; None means all local tokens form one group."""
    examples_per_group: float | None = None
    """Alternative to group_size: S = examples_per_group * L."""
    slots_per_expert: int = 1
    """Soft router: slots per expert."""
    activation: str = "gelu"
    """Expert activation: "relu", "gelu" (exact erf), "swiglu", "geglu" or "clamped_swiglu" (gpt-oss)."""
    swiglu_alpha: float = SWIGLU_ALPHA
    """clamped_swiglu only: the slope alpha of its gate, g * sigmoid(alpha * g)."""
    swiglu_limit: float = SWIGLU_LIMIT
    """clamped_swiglu only: the gate is clamped to <= limit, the up projection to [-limit, limit]."""
    normalize_topk: bool = True
    """Renormalise the K gate weights of a token to sum to 1."""
    bias: bool = False
    """Add biases to the expert projections."""
    router_bias: bool = False
    """Add a learned bias router.bias [E] to the router logits, x @ W.T + b (gpt-oss)."""
    router_jitter: float = 0.0
    """Epsilon: in training the router input is multiplied by U(1 - eps, 1 + eps)."""
    dropout: float = 0.0
    """Dropout probability on the layer output, training only."""
    load_balance_coef: float = 0.01
    """Weight of load_balance_loss in aux.loss."""
    z_loss_coef: float = 0.001
    """Weight of z_loss in aux.loss."""
    dtype: torch.dtype = torch.float32
    """Parameter dtype (a torch.dtype or its name)."""
    router_dtype: torch.dtype = torch.float32
    """Dtype of all routing math (a torch.dtype or its name)."""
    score_func: str = "softmax"
    """Token-choice scores: "softmax" over experts, or "sigmoid" per expert (DeepSeek-V3)."""
    route_scale: float = 1.0
    """Gates are multiplied by it after the optional normalisation (DeepSeek's routed_scaling_factor)."""
    bias_update_rate: float | None = None
    """Aux-loss-free balancing: a per-expert selection bias, updated by ep.update_expert_bias."""
    num_expert_groups: int | None = None
    """G for group-limited routing: the experts form G contiguous groups."""
    num_limited_groups: int | None = None
    """M for group-limited routing: each token picks its experts from its best M groups."""
    num_shared_experts: int = 0
    """Always-on shared experts, as one FeedForward of width shared_d_ff, replicated on every rank."""
    shared_d_ff: int | None = None
    """Hidden width of the shared experts; None means d_ff * num_shared_experts."""
    shared_expert_gate: bool = False
    """Multiply the shared output by sigmoid(x · shared_gate.weight[0]) (Qwen2-MoE)."""
    seq_aux_loss_coef: float = 0.0
    """Weight of DeepSeek-V3's sequence-wise balance loss (MoEAux.seq_balance_loss) in aux.loss."""
    exchange: str = "flat"
    """"flat" (one all-to-all, a row per routed copy) or "hierarchical" (a token crosses to each
    remote node at most once and fans out there; partial outputs are summed inside the node)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", to_dtype("dtype", self.dtype))
        object.__setattr__(self, "router_dtype", to_dtype("router_dtype", self.router_dtype))
        self._check_sizes()
        self._check_choices()
        self._check_capacity()
        self._check_groups()
        self._check_reals()
        self._check_modern_routing()
        self._check_shared()
        self._check_clamped_swiglu()
        self._check_exchange()

    def _check_sizes(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k", "min_capacity", "slots_per_expert"):
            value = getattr(self, name)
            low = 0 if name == "min_capacity" else 1
            if not _is_int(value) or value < low:
                raise _fail(name, value, f"expected an integer >= {low}")
        if self.top_k > self.num_experts:
            raise _fail("top_k", self.top_k, f"expected 1 <= top_k <= num_experts={self.num_experts}")

    def _check_choices(self) -> None:
        for name, allowed in (("router", ROUTERS), ("activation", ACTIVATIONS),
                              ("drop_policy", DROP_POLICIES)):
            if getattr(self, name) not in allowed:
                raise _fail(name, getattr(self, name), f"expected one of {list(allowed)}")
        for name in ("normalize_topk", "bias", "router_bias"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, getattr(self, name), "expected True or False")

    def _check_capacity(self) -> None:
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is None:
                if self.router not in TOKEN_CHOICE_ROUTERS and self.expert_capacity is None:
                    raise _fail(name, value, f"dropless (None) needs router in "
                                f"{list(TOKEN_CHOICE_ROUTERS)}; router={self.router!r} needs a "
                                "positive factor or expert_capacity")
            elif not _is_real(value) or value <= 0:
                raise _fail(name, value, "expected a positive number, or None for dropless")
        if self.expert_capacity is not None and (
                not _is_int(self.expert_capacity) or self.expert_capacity < 1):
            raise _fail("expert_capacity", self.expert_capacity, "expected an integer >= 1 or None")

    def _check_groups(self) -> None:
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            raise _fail("group_size", self.group_size, "expected an integer >= 1 or None")
        epg = self.examples_per_group
        if epg is not None and (not _is_real(epg) or epg <= 0):
            raise _fail("examples_per_group", epg, "expected a positive number or None")
        if self.group_size is not None and epg is not None:
            raise _fail("examples_per_group", epg, "set group_size or examples_per_group, not both")

    def _check_reals(self) -> None:
        for name, high in (("router_jitter", 1.0), ("dropout", 1.0)):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < high:
                raise _fail(name, value, f"expected a number in [0, {high})")
        for name in ("load_balance_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise _fail(name, value, "expected a number >= 0")

    def _check_clamped_swiglu(self) -> None:
        for name, default in (("swiglu_alpha", SWIGLU_ALPHA), ("swiglu_limit", SWIGLU_LIMIT)):
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                raise _fail(name, value, "expected a positive number")
            if value != default and self.activation != "clamped_swiglu":
                raise _fail(name, value, f"expected the default {default}: it is used by "
                            f"activation='clamped_swiglu' only, not activation={self.activation!r}")

    def _check_modern_routing(self) -> None:
        if self.score_func not in SCORE_FUNCS:
            raise _fail("score_func", self.score_func, f"expected one of {list(SCORE_FUNCS)}")
        if not _is_real(self.route_scale) or self.route_scale <= 0:
            raise _fail("route_scale", self.route_scale, "expected a positive number")
        rate = self.bias_update_rate
        if rate is not None and (not _is_real(rate) or rate <= 0):
            raise _fail("bias_update_rate", rate, "expected a positive number or None")
        if not _is_real(self.seq_aux_loss_coef) or self.seq_aux_loss_coef < 0:
            raise _fail("seq_aux_loss_coef", self.seq_aux_loss_coef, "expected a number >= 0")
        for name, off in (("score_func", self.score_func == "softmax"), ("bias_update_rate", rate is None),
                          ("num_expert_groups", self.num_expert_groups is None),
                          ("seq_aux_loss_coef", self.seq_aux_loss_coef == 0)):
            if not off and not self.token_choice:
                raise _fail(name, getattr(self, name), f"needs a token-choice router "
                            f"{list(TOKEN_CHOICE_ROUTERS)}, not router={self.router!r}")
        self._check_expert_groups()

    def _check_expert_groups(self) -> None:
        G, M, E = self.num_expert_groups, self.num_limited_groups, self.num_experts
        if (G is None) != (M is None):
            name = "num_limited_groups" if M is None else "num_expert_groups"
            raise _fail(name, getattr(self, name), "set num_expert_groups and num_limited_groups together")
        if G is None or M is None:
            return
        if not _is_int(G) or G < 1 or E % G:
            raise _fail("num_expert_groups", G, f"expected an integer >= 1 dividing num_experts={E}")
        if not _is_int(M) or not 1 <= M <= G:
            raise _fail("num_limited_groups", M, f"expected an integer in [1, num_expert_groups={G}]")
        if self.top_k > M * (E // G):
            raise _fail("num_limited_groups", M, f"{M} groups of {E // G} experts hold fewer than "
                        f"top_k={self.top_k} experts")

    def _check_shared(self) -> None:
        n = self.num_shared_experts
        if not _is_int(n) or n < 0:
            raise _fail("num_shared_experts", n, "expected an integer >= 0")
        if self.shared_d_ff is not None and (not _is_int(self.shared_d_ff) or self.shared_d_ff < 1):
            raise _fail("shared_d_ff", self.shared_d_ff, "expected an integer >= 1 or None")
        if not isinstance(self.shared_expert_gate, bool):
            raise _fail("shared_expert_gate", self.shared_expert_gate, "expected True or False")
        for name, value in (("shared_d_ff", self.shared_d_ff is not None),
                            ("shared_expert_gate", self.shared_expert_gate)):
            if value and n == 0:
                raise _fail(name, getattr(self, name), "needs num_shared_experts >= 1")

    def _check_exchange(self) -> None:
        if self.exchange not in EXCHANGES:
            raise _fail("exchange", self.exchange, f"expected one of {list(EXCHANGES)}")
        if self.exchange == "hierarchical" and self.router == "soft":
            raise _fail("exchange", self.exchange, "the soft router's rows are slot mixes, not token "
                        "copies, so there is nothing to deduplicate: use exchange='flat'")

    # ---- derived values ----
    @property
    def gated(self) -> bool:
        """True for swiglu / geglu, whose experts have a third (gate) projection."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def token_choice(self) -> bool:
        """True for the routers where each token picks its experts (topk, noisy_topk)."""
        return self.router in TOKEN_CHOICE_ROUTERS

    @property
    def shared_width(self) -> int:
        """Hidden width of the shared experts (0 without them)."""
        return self.shared_d_ff or self.d_ff * self.num_shared_experts

    def capacity_factor_for(self, training: bool) -> float | None:
        """The capacity factor in force: capacity_factor in training, else eval_capacity_factor."""
        return self.capacity_factor if training else self.eval_capacity_factor

    def replace(self, **changes: Any) -> MoEConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
