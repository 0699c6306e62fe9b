"""Auxiliary losses and routing metrics (MoEAux). Math only, no communication."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dispatch import CommReport


@dataclass(frozen=True)
class MoEAux:
    """Auxiliary losses and routing statistics of one MoE call.

    Attributes:
        loss: load_balance_coef * load_balance_loss + z_loss_coef * z_loss (differentiable).
        load_balance_loss: E * sum_e f_e * P_e, averaged over groups (1.0 when balanced).
        z_loss: mean over tokens of logsumexp(logits)^2.
        router_entropy: mean over tokens of -sum_e p log p.
        dropped_fraction: dropped assignments / all assignments.
        expert_counts: int64 [E], kept assignments per expert (summed over the expert-parallel
            group under expert parallelism).
        seq_balance_loss: DeepSeek-V3's sequence-wise balance loss, mean over sequences of
            Σ_i f_i P_i (1.0 when balanced; 0 for expert choice and soft).
        max_violation: max_i c_i / mean(c) - 1 over the selected assignments per expert c (before
            drops; summed over the expert-parallel group), 0 when balanced (MaxVio).
        comm: the traffic report of the call (:class:`CommReport`), None when not available.
    """

    loss: Tensor
    load_balance_loss: Tensor
    z_loss: Tensor
    router_entropy: Tensor
    dropped_fraction: Tensor
    expert_counts: Tensor
    seq_balance_loss: Tensor
    max_violation: Tensor
    comm: CommReport | None = None


def load_balance_loss(idx_GSK: Tensor, probs_GSE: Tensor) -> Tensor:
    """Switch/GShard balance loss E * sum_e f_e P_e per group, averaged over groups.

    f_e is the share of the group's S*K assignments that chose e (before drops), P_e the mean
    probability of e over the group's tokens.
    """
    G, S, K = idx_GSK.shape
    E = probs_GSE.shape[-1]
    chosen_GE = torch.zeros(G, E, dtype=probs_GSE.dtype, device=probs_GSE.device)
    chosen_GE.scatter_add_(1, idx_GSK.reshape(G, S * K), probs_GSE.new_ones(G, S * K))
    f_GE = chosen_GE / (S * K)
    p_GE = probs_GSE.mean(dim=1)
    return (E * (f_GE * p_GE).sum(dim=-1)).mean()


def seq_balance_loss(idx_BLK: Tensor, probs_BLE: Tensor) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over the B sequences of L tokens.

    Per sequence: Σ_i f_i P_i with f_i = E / (K·L) · (tokens that selected i) and P_i the mean over
    the sequence of the normalised scores of i.
    """
    B, L, K = idx_BLK.shape
    E = probs_BLE.shape[-1]
    chosen_BE = torch.zeros(B, E, dtype=probs_BLE.dtype, device=probs_BLE.device)
    chosen_BE.scatter_add_(1, idx_BLK.reshape(B, L * K), probs_BLE.new_ones(B, L * K))
    f_BE = chosen_BE * (E / (K * L))
    return (f_BE * probs_BLE.mean(dim=1)).sum(dim=-1).mean()


def max_violation(selected_E: Tensor) -> Tensor:
    """MaxVio: max_i c_i / mean(c) - 1 (0 for no assignments)."""
    c = selected_E.float()
    return torch.where(c.sum() > 0, c.max() / c.mean().clamp_min(1e-12) - 1, torch.zeros_like(c[0]))


def z_loss(logits_GSE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_GSE, dim=-1).square().mean()


def router_entropy(logits_GSE: Tensor) -> Tensor:
    """Mean over tokens of the entropy of the router distribution."""
    logp_GSE = torch.log_softmax(logits_GSE, dim=-1)
    return -(logp_GSE.exp() * logp_GSE).sum(dim=-1).mean()


def make_aux(*, balance: Tensor, zloss: Tensor, entropy: Tensor, dropped: Tensor, counts_E: Tensor,
             seq: Tensor, balance_coef: float, z_coef: float, seq_coef: float) -> MoEAux:
    """Assembles MoEAux; the weighted total is the only differentiable output the model needs.

    max_violation starts at 0: the layer fills it in from the group-wide counts.
    """
    return MoEAux(loss=balance_coef * balance + z_coef * zloss + seq_coef * seq, load_balance_loss=balance,
                  z_loss=zloss, router_entropy=entropy, dropped_fraction=dropped,
                  expert_counts=counts_E, seq_balance_loss=seq, max_violation=torch.zeros_like(zloss))


def empty_aux(num_experts: int, device: torch.device) -> MoEAux:
    """MoEAux of a call with no tokens: zero losses, nothing dropped, zero counts."""
    zero = torch.zeros((), device=device)
    return MoEAux(loss=zero, load_balance_loss=zero, z_loss=zero, router_entropy=zero,
                  dropped_fraction=zero, expert_counts=torch.zeros(num_experts, dtype=torch.int64,
                                                                   device=device),
                  seq_balance_loss=zero, max_violation=zero)
