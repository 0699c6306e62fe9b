"""Routers and routing arithmetic: groups, capacity, top-k gates. Math only, no communication.

All routing math runs in ``router_dtype`` (float32 by default) whatever the activation dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig, to_dtype


class TopKOutput(NamedTuple):
    """What a token-choice router returns for input x [..., D]."""

    gates: Tensor
    """[..., K] gate weights (sum to 1 per token when normalize_topk)."""
    indices: Tensor
    """[..., K] int64 expert ids in [0, E), best first."""
    probs: Tensor
    """[..., E] the full router probabilities."""


def topk_from_logits(logits_XE: Tensor, top_k: int, normalize: bool) -> TopKOutput:
    """Softmax over experts, then each token's K largest probabilities (renormalised if asked)."""
    probs_XE = torch.softmax(logits_XE, dim=-1)
    gates_XK, idx_XK = torch.topk(probs_XE, top_k, dim=-1)
    if normalize:
        gates_XK = gates_XK / gates_XK.sum(dim=-1, keepdim=True)
    return TopKOutput(gates_XK, idx_XK, probs_XE)


class TopKRouter(nn.Module):
    """Softmax top-k router (Switch routing for K=1). ``weight`` is [E, D].

    Called on x [..., D] it returns :class:`TopKOutput` (gates [..., K], indices [..., K],
    probs [..., E]). In training the router input is multiplied by U(1 - jitter, 1 + jitter).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *,
                 normalize_topk: bool = True, jitter: float = 0.0,
                 router_dtype: torch.dtype | str = torch.float32,
                 dtype: torch.dtype | str = torch.float32, num_outputs: int | None = None) -> None:
        super().__init__()
        # Validation of the shared fields lives in one place: MoEConfig.
        MoEConfig(d_model=d_model, d_ff=1, num_experts=num_experts, top_k=top_k,
                  normalize_topk=normalize_topk, router_jitter=jitter)
        self.num_experts, self.top_k = num_experts, top_k
        self.normalize_topk, self.jitter = normalize_topk, jitter
        self.router_dtype = to_dtype("router_dtype", router_dtype)
        rows = num_experts if num_outputs is None else num_outputs
        self.weight = nn.Parameter(
            (torch.randn(rows, d_model) * 0.02).to(to_dtype("dtype", dtype)))

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> TopKRouter:
        """The router of an MoE layer built from ``cfg``."""
        return cls(cfg.d_model, cfg.num_experts, cfg.top_k, normalize_topk=cfg.normalize_topk,
                   jitter=cfg.router_jitter, router_dtype=cfg.router_dtype, dtype=cfg.dtype)

    def router_input(self, x_XD: Tensor) -> Tensor:
        """x in router_dtype, multiplied by the jitter noise in training."""
        x_XD = x_XD.to(self.router_dtype)
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_XD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_XD = x_XD * noise
        return x_XD

    def logits(self, x_XD: Tensor) -> Tensor:
        """Routing logits [..., E] in router_dtype (what the top-k is taken over)."""
        return F.linear(self.router_input(x_XD), self.weight.to(self.router_dtype))

    def forward(self, x_XD: Tensor) -> TopKOutput:
        """Routes x [..., D]: gates [..., K], indices [..., K], probs [..., E]."""
        return topk_from_logits(self.logits(x_XD), self.top_k, self.normalize_topk)


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017): in training the logits get
    ``randn * softplus(x @ noise.weight.T)``; in eval it is exactly :class:`TopKRouter`.
    ``noise.weight`` is [E, D], initialised to zero as in the paper.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, **kwargs: object) -> None:
        super().__init__(d_model, num_experts, top_k, **kwargs)  # type: ignore[arg-type]
        self.noise = nn.Linear(d_model, num_experts, bias=False, dtype=self.weight.dtype)
        nn.init.zeros_(self.noise.weight)

    def logits(self, x_XD: Tensor) -> Tensor:
        """Routing logits, with the learned noise added in training."""
        x_XD = self.router_input(x_XD)
        logits_XE = F.linear(x_XD, self.weight.to(self.router_dtype))
        if self.training:
            std_XE = F.softplus(F.linear(x_XD, self.noise.weight.to(self.router_dtype)))
            logits_XE = logits_XE + torch.randn_like(logits_XE) * std_XE
        return logits_XE


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


def make_router(cfg: MoEConfig) -> TopKRouter:
    """The router module named by ``cfg.router``."""
    if cfg.router == "topk":
        return TopKRouter.from_config(cfg)
    if cfg.router == "noisy_topk":
        return NoisyTopKRouter.from_config(cfg)
    raise NotImplementedError(f"router={cfg.router!r} is not available in this version")
