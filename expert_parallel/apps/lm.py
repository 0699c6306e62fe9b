"""A small decoder-only transformer whose feed-forward blocks are FeedForward or MoE.

Routing groups are chosen so that the model is causal and its numbers do not depend on the
expert-parallel layout:
- top-k / noisy top-k route one sequence per group (``examples_per_group=1``), so a rank's routing
  never depends on another rank's tokens;
- expert choice and soft routing mix the tokens of a group, so they route **per position**: the MoE
  sees position-major tokens and each group holds one position of every local sequence; a token's
  output never depends on later positions (docs/routing.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from ..comm.distributed import unsharded
from ..config import MoEConfig
from ..layer import MoE, configure_debug
from ..ops.experts import FeedForward
from ..ops.losses import MoEAux
from ..ops.routing import TOKEN_MIXING_ROUTERS, check_causal_routing


@dataclass(frozen=True)
class LMConfig:
    """Shape of the language model; MoE blocks use ``moe`` (its d_model must equal d_model)."""

    vocab_size: int = 256
    """Byte-level by default."""
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    d_ff: int = 512
    """Hidden width of the dense FeedForward blocks."""
    moe: MoEConfig | None = None
    """None: every block dense. Otherwise the MoE layer of the MoE blocks."""
    moe_every: int = 1
    """Every n-th block (1, 2, ...) is an MoE block, counting from the last."""
    position_groups: bool | None = None
    """Route per position (True) or per sequence (False); None picks what is causal for the router."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "d_ff", "moe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LMConfig.{name}={value!r} is invalid: expected an integer >= 1")
        if self.d_model % self.n_heads:
            raise ValueError(f"LMConfig.n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.moe is not None:
            if self.moe.d_model != self.d_model:
                raise ValueError(f"LMConfig.moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")
            check_causal_routing(self.moe, per_position_groups=self.per_position)

    @property
    def per_position(self) -> bool:
        """Whether MoE blocks route per position (token-mixing routers) or per sequence."""
        if self.position_groups is None:
            return self.moe is not None and self.moe.router in TOKEN_MIXING_ROUTERS
        return self.position_groups

    def is_moe_block(self, index: int) -> bool:
        """Block ``index`` (0-based) is an MoE block."""
        return self.moe is not None and (self.n_layers - 1 - index) % self.moe_every == 0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with scaled_dot_product_attention."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x_BLD: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).split(D, dim=-1)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a FeedForward or MoE feed-forward."""

    def __init__(self, cfg: LMConfig, use_moe: bool, ep_group: ProcessGroup | None) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.per_position = cfg.per_position
        self.ffn: nn.Module
        if use_moe:
            assert cfg.moe is not None
            self.ffn = MoE(cfg.moe.replace(examples_per_group=1, group_size=None), ep_group=ep_group)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.d_ff)

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, MoEAux | None]:
        x_BLD = x_BLD + self.attn(self.ln1(x_BLD))
        h_BLD = self.ln2(x_BLD)
        if not isinstance(self.ffn, MoE):
            return x_BLD + self.ffn(h_BLD), None
        if self.per_position:  # each routing group = one position of every local sequence
            y_LBD, aux = self.ffn(h_BLD.transpose(0, 1).contiguous())
            return x_BLD + y_LBD.transpose(0, 1), aux
        y_BLD, aux = self.ffn(h_BLD)
        return x_BLD + y_BLD, aux


def lm_loss(logits: Tensor, auxes: list[MoEAux], targets_BL: Tensor) -> tuple[Tensor, Tensor, list[MoEAux]]:
    """(task loss, task loss + all aux losses, aux list) of a forward's output: next-token
    cross-entropy. For a wrapper (DistributedDataParallel) that must run the forward itself."""
    task = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets_BL.reshape(-1))
    total = task + sum((a.loss for a in auxes), torch.zeros((), device=task.device))
    return task, total, auxes


class LanguageModel(nn.Module):
    """Decoder-only transformer LM; ``forward(idx_BL)`` returns logits [B, L, V] and the MoE aux list.

    Args:
        cfg: the model shape.
        ep_group: expert-parallel group of the MoE blocks (None: every expert local).
    """

    def __init__(self, cfg: LMConfig, ep_group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_block(i), ep_group) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied embeddings
        self._init_embeddings()
        self.activation_checkpointing = False  # recompute each block in the backward
        configure_debug(self)  # MoE layers named "blocks.3.ffn" etc. in error messages

    def _init_embeddings(self) -> None:
        for emb in (self.tok_emb, self.pos_emb):  # small embeddings: logits start near uniform
            nn.init.normal_(emb.weight, std=0.02)

    def init_weights(self) -> None:
        """Initialises every parameter in place, e.g. after ``to_empty`` of a model built on the meta
        device (also when sharded by ``ep.fully_shard``): each MoE by its ``reset_parameters``
        (the values of a direct build from its generator state), every other module by its own, the
        embeddings as the constructor does."""
        inside_moe = {id(m) for moe in self.modules() if isinstance(moe, MoE) for m in moe.modules()}
        for module in self.modules():
            if isinstance(module, MoE):
                module.reset_parameters()
            elif id(module) not in inside_moe and isinstance(module, FeedForward | nn.Linear | nn.LayerNorm):
                # whole tensors drawn alike on every rank, each rank keeping its shard: DTensor's
                # own random fill on a CPU mesh would draw the same values into every shard
                with unsharded(module):
                    module.reset_parameters()
        with unsharded(self.tok_emb), unsharded(self.pos_emb):
            self._init_embeddings()

    def forward(self, idx_BL: Tensor) -> tuple[Tensor, list[MoEAux]]:
        """Logits [B, L, vocab] and the aux of every MoE block (first to last)."""
        L = idx_BL.shape[1]
        if self.cfg.max_seq_len < L:
            raise ValueError(f"sequence length {L} exceeds LMConfig.max_seq_len={self.cfg.max_seq_len}")
        x_BLD = self.tok_emb(idx_BL) + self.pos_emb(torch.arange(L, device=idx_BL.device))
        auxes: list[MoEAux] = []
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x_BLD, aux = checkpoint(block, x_BLD, use_reentrant=False)
            else:
                x_BLD, aux = block(x_BLD)
            if aux is not None:
                auxes.append(aux)
        return self.head(self.ln_f(x_BLD)), auxes

    def loss(self, idx_BL: Tensor, targets_BL: Tensor) -> tuple[Tensor, Tensor, list[MoEAux]]:
        """(task loss, task loss + all aux losses, aux list): next-token cross-entropy."""
        logits, auxes = self(idx_BL)
        return lm_loss(logits, auxes, targets_BL)

    def active_parameters_per_token(self) -> int:
        """Parameters that one token uses in a forward pass (MoE: K of E experts; EC: cf of E)."""
        total = 0
        for name, p in self.named_parameters():
            if ".ffn.experts." in name and self.cfg.moe is not None:
                moe = self.cfg.moe
                # token choice: K experts; expert choice: capacity_factor experts on average;
                # soft: counted as one expert (its slots are mixes of the group's tokens)
                per_token: float = float(moe.top_k) if moe.token_choice else 1.0
                if moe.router == "expert_choice":
                    per_token = moe.capacity_factor or 1.0
                total += int(p.numel() // p.shape[0] * per_token)
            elif name != "pos_emb.weight":
                total += p.numel()
        return total
