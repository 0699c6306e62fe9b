"""Expert feed-forward networks: the grouped expert GEMMs and the dense FeedForward baseline.

Math only, no communication. Rows handed to the experts are sorted by local expert; ``counts_e``
says how many rows each local expert owns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ACTIVATIONS, GATED_ACTIVATIONS, MoEConfig


def activate(h_ND: Tensor, activation: str) -> Tensor:
    """The activation of an ungated expert, or the gate's activation of a gated one."""
    if activation == "relu":
        return F.relu(h_ND)
    if activation in ("gelu", "geglu"):
        return F.gelu(h_ND)  # exact (erf) GELU
    return F.silu(h_ND)  # swiglu


def _seeded_generator(base_seed: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on (base_seed, index): layout-independent initialisation."""
    return torch.Generator().manual_seed((base_seed * 1_000_003 + index) % (2**63 - 1))


def draw_base_seed() -> int:
    """One draw from torch's global generator; every layer built afterwards draws a fresh one."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _init_ffn(d_model: int, d_ff: int, gated: bool, bias: bool,
              generator: torch.Generator | None) -> dict[str, Tensor]:
    """One expert's weights in the dense layout (w_in [D, F], w_gate [D, F], w_out [F, D], biases)."""
    def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    weights = {"w_in": uniform((d_model, d_ff), d_model)}
    if gated:
        weights["w_gate"] = uniform((d_model, d_ff), d_model)
    weights["w_out"] = uniform((d_ff, d_model), d_ff)
    if bias:
        weights["b_in"] = torch.zeros(d_ff)
        if gated:
            weights["b_gate"] = torch.zeros(d_ff)
        weights["b_out"] = torch.zeros(d_model)
    return weights


MatMul = Callable[[Tensor, Tensor], Tensor]


def _matmul(x: Tensor, w: Tensor) -> Tensor:
    return x @ w


def _add(h: Tensor, b: Tensor) -> Tensor:
    return h + b


def ffn(x_ND: Tensor, w: Mapping[str, Tensor], activation: str, mm: MatMul = _matmul,
        add_bias: MatMul = _add) -> Tensor:
    """The expert MLP on rows: ``(act(x @ w_gate) * (x @ w_in)) @ w_out`` or ``act(x @ w_in) @ w_out``.

    ``w`` holds the tensors by state-dict name (w_in, w_gate, w_out, b_in, b_gate, b_out); ``mm`` and
    ``add_bias`` let the grouped path use grouped_mm and per-row biases with the same formula.
    """
    h_NF = mm(x_ND, w["w_in"])
    if "b_in" in w:
        h_NF = add_bias(h_NF, w["b_in"])
    if activation in GATED_ACTIVATIONS:
        g_NF = mm(x_ND, w["w_gate"])
        if "b_gate" in w:
            g_NF = add_bias(g_NF, w["b_gate"])
        h_NF = activate(g_NF, activation) * h_NF
    else:
        h_NF = activate(h_NF, activation)
    y_ND = mm(h_NF, w["w_out"])
    if "b_out" in w:
        y_ND = add_bias(y_ND, w["b_out"])
    return y_ND


def _can_use_grouped_mm(x_ND: Tensor, d_model: int, d_ff: int) -> bool:
    # torch's grouped_mm kernel needs CUDA, bf16 and 16-byte aligned strides; on CPU its backward is
    # not implemented (torch 2.13), so the CPU path loops over experts on contiguous row slices.
    return (hasattr(F, "grouped_mm") and x_ND.is_cuda and x_ND.dtype == torch.bfloat16
            and d_model % 8 == 0 and d_ff % 8 == 0)


class GroupedExperts(nn.Module):
    """The experts held by this rank: ``num_local`` consecutive experts starting at ``first``.

    Parameters (state-dict keys): ``w_in`` [e, D, F], ``w_gate`` [e, D, F] (gated activations),
    ``w_out`` [e, F, D], with ``bias`` also ``b_in`` [e, F], ``b_gate`` [e, F], ``b_out`` [e, D].
    Expert i is initialised from (base_seed, i) only, so the weights do not depend on the layout.
    """

    def __init__(self, cfg: MoEConfig, base_seed: int, num_local: int | None = None,
                 first: int = 0) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.d_model, self.d_ff = cfg.d_model, cfg.d_ff
        self.first = first
        self.num_local = cfg.num_experts if num_local is None else num_local
        per_expert = [_init_ffn(cfg.d_model, cfg.d_ff, cfg.gated, cfg.bias,
                                _seeded_generator(base_seed, first + i))
                      for i in range(self.num_local)]
        for name in per_expert[0] if per_expert else []:
            stacked = torch.stack([w[name] for w in per_expert]).to(cfg.dtype)
            self.register_parameter(name, nn.Parameter(stacked))

    def weights(self) -> dict[str, Tensor]:
        """The stacked expert tensors by state-dict name."""
        return dict(self.named_parameters())

    def forward(self, x_ND: Tensor, counts_e: Tensor) -> Tensor:
        """Runs every local expert on its rows.

        Args:
            x_ND: rows sorted by local expert.
            counts_e: int64 [e], rows per local expert (sums to N).

        Returns:
            y_ND: the expert outputs, row for row.
        """
        w = self.weights()
        if _can_use_grouped_mm(x_ND, self.d_model, self.d_ff):
            offs_e = torch.cumsum(counts_e, 0).to(torch.int32)
            expert_N = torch.repeat_interleave(
                torch.arange(self.num_local, device=x_ND.device), counts_e,
                output_size=x_ND.shape[0])
            return ffn(x_ND, w, self.activation,
                       mm=lambda a, b: F.grouped_mm(a, b, offs=offs_e),
                       add_bias=lambda h, b: h + b[expert_N])
        # NOTE: host-device sync: the row counts are needed on the host to slice the rows.
        sizes = counts_e.tolist()
        # Experts with no rows still run (on an empty slice): the output must always depend on
        # x_ND and the weights, or a rank that received nothing would skip the backward
        # all-to-alls that its peers wait in.
        outputs = [ffn(x_nD, {k: v[i] for k, v in w.items()}, self.activation)
                   for i, x_nD in enumerate(torch.split(x_ND, sizes))]
        return torch.cat(outputs)


class FeedForward(nn.Module):
    """Dense feed-forward baseline with the layout of one expert.

    Parameters: ``w_in`` [D, F], ``w_gate`` [D, F] (swiglu / geglu), ``w_out`` [F, D], and with
    ``bias`` ``b_in`` [F], ``b_gate`` [F], ``b_out`` [D]: a dense checkpoint upcycles into experts by
    copying these tensors into every expert row.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0,
                 bias: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # The config validates the arguments shared with MoE (sizes, activation, dropout, dtype).
        cfg = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=1, top_k=1,
                        activation=activation, dropout=dropout, bias=bias, dtype=dtype)
        self.activation, self.d_model = cfg.activation, d_model
        self.dropout = nn.Dropout(cfg.dropout)
        for name, value in _init_ffn(d_model, d_ff, cfg.gated, bias, None).items():
            self.register_parameter(name, nn.Parameter(value.to(cfg.dtype)))

    def forward(self, x_BLD: Tensor) -> Tensor:
        """Args: x_BLD [..., D]. Returns: y [..., D], same shape and dtype."""
        if x_BLD.shape[-1] != self.d_model:
            raise ValueError(f"FeedForward expected last dimension d_model={self.d_model}, "
                             f"got input of shape {tuple(x_BLD.shape)}")
        weights: dict[str, Tensor] = dict(self.named_parameters())
        return self.dropout(ffn(x_BLD, weights, self.activation))


__all__ = ["ACTIVATIONS", "FeedForward", "GroupedExperts", "activate", "draw_base_seed", "ffn"]
