"""Hugging Face transformers MoE models, expert-parallel with no change to the model code.

``expert_parallelize(model, ctx)`` finds the sparse MoE blocks of the supported families and
replaces each, in place, with an :class:`ExpertParallelBlock`: the family's own router module (kept,
so ``output_router_logits`` recording and HF's aux loss work as before; its logits feed our routing),
an ``ep.MoE`` configured with the family's routing semantics that holds this rank's E / ep_size
experts (converted from transformers' fused ``gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F]),
and the family's shared experts, replicated. Attention, dense layers and embeddings are untouched.

Families (``config.model_type``): mixtral, qwen2_moe, qwen3_moe, deepseek_v3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..comm.distributed import DistContext
from ..config import MoEConfig
from ..layer import MoE
from ..ops.losses import MoEAux

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("expert_parallel.hf needs transformers: install the extra with "
                      "pip install \"expert-parallel[hf]\"") from err


@dataclass(frozen=True)
class Family:
    """How a transformers model family routes (the MoEConfig fields that differ between them)."""

    score_func: str
    shared: tuple[str, ...]  # attribute names of the block's shared-expert modules, in call order
    expert_bias: bool = False  # DeepSeek's e_score_correction_bias

    def routing(self, config: Any) -> dict[str, Any]:
        """MoEConfig routing fields from the model's config."""
        fields: dict[str, Any] = {"score_func": self.score_func,
                                  "normalize_topk": bool(getattr(config, "norm_topk_prob", True))}
        if self.score_func == "sigmoid":  # DeepSeek-V3
            fields.update(route_scale=float(config.routed_scaling_factor))
            if getattr(config, "n_group", None) and getattr(config, "topk_group", None):
                fields.update(num_expert_groups=config.n_group, num_limited_groups=config.topk_group)
        if self.expert_bias:
            fields["bias_update_rate"] = 1e-3  # DeepSeek-V3's γ; the bias itself is the model's buffer
        return fields


FAMILIES = {
    "mixtral": Family("softmax", ()),
    "qwen3_moe": Family("softmax", ()),
    "qwen2_moe": Family("softmax", ("shared_expert", "shared_expert_gate")),
    "deepseek_v3": Family("sigmoid", ("shared_experts",), expert_bias=True),
}
_ACTIVATIONS = {"silu": "swiglu", "gelu": "geglu"}  # transformers' hidden_act -> our gated activation


def _is_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return (hasattr(module, "gate") and hasattr(module.gate, "weight")
            and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"))


class ExpertParallelBlock(nn.Module):
    """A family's sparse MoE block with its experts sharded: same call signature and return value.

    Submodules: ``gate`` (the family's router, replicated, called for its logits), ``moe`` (an
    ``ep.MoE`` whose ``router.weight`` is the gate's weight and, for DeepSeek, whose
    ``router.expert_bias`` is the gate's ``e_score_correction_bias``), and the family's shared experts
    under their own names.
    """

    def __init__(self, block: Any, family: Family, config: Any, ctx: DistContext | None,
                 local: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__()
        experts: Any = block.experts
        gate: Any = block.gate
        E, twoF, D = experts.gate_up_proj.shape
        F = twoF // 2
        activation = _ACTIVATIONS.get(str(config.hidden_act))
        if activation is None:
            raise ValueError(f"hidden_act={config.hidden_act!r} of model_type {config.model_type!r} is not "
                             f"supported: expected one of {sorted(_ACTIVATIONS)}")
        self.gate = gate
        self.score_func = family.score_func
        self.last_aux: MoEAux | None = None
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        for name in family.shared:
            setattr(self, name, getattr(block, name))
        self.shared_names = family.shared
        cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=int(config.num_experts_per_tok),
                        capacity_factor=None, eval_capacity_factor=None, activation=activation,
                        load_balance_coef=0.0,
                        z_loss_coef=0.0, dtype=experts.gate_up_proj.dtype, **family.routing(config))
        ep_group = ctx.ep_group if ctx is not None else None
        device = gate.weight.device
        with torch.random.fork_rng(devices=[]):  # its own initial weights are replaced below
            torch.default_generator.manual_seed(0)  # the CPU generator only: GPU seeds stay the user's
            self.moe = MoE(cfg, ep_group=ep_group).to(device)
        first, count = self.moe.experts.first, self.moe.experts.num_local
        if local is None:  # this rank's rows of the model's own expert tensors
            local = (experts.gate_up_proj.detach()[first:first + count],
                     experts.down_proj.detach()[first:first + count])
        self._adopt(gate, local, F)
        self.moe.check_replicas()  # the model's router (and bias) must agree across the group

    def _adopt(self, gate: Any, local: tuple[Tensor, Tensor], F: int) -> None:
        """The gate's weight (and bias buffer) shared; this rank's experts (transformers' layout:
        gate_up [e, 2F, D], down [e, D, F]) converted and copied."""
        self.moe.router.weight = gate.weight
        self._link_bias()
        gate_up, down = local
        mine = self.moe.experts.weights()
        with torch.no_grad():  # linear(x, W) = x @ W.T: [E, F, D] rows become [E, D, F] columns
            mine["w_gate"].copy_(gate_up[:, :F, :].transpose(1, 2))
            mine["w_in"].copy_(gate_up[:, F:, :].transpose(1, 2))
            mine["w_out"].copy_(down.transpose(1, 2))

    def _link_bias(self) -> None:
        bias = getattr(self.gate, "e_score_correction_bias", None)
        if bias is not None and getattr(self.moe.router, "expert_bias", None) is not None:
            self.moe.router.expert_bias = bias  # one tensor: update_expert_bias trains the model's own

    def _apply(self, fn: Any, recurse: bool = True) -> ExpertParallelBlock:
        # The bias stays fp32 (a bf16 bias would swallow updates of 1e-3): moved, never cast.
        bias = getattr(self.gate, "e_score_correction_bias", None)
        super()._apply(fn, recurse)
        if bias is not None:
            self.gate.e_score_correction_bias = bias.to(fn(bias[:0]).device)
        self.moe.router.weight = self.gate.weight  # conversions may swap parameters: share again
        self._link_bias()
        return self

    def forward(self, hidden_states: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, D], as the family's block."""
        if self.training and self.jitter_noise > 0:  # Mixtral: both router and experts see it
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        flat_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        gate: Any = self.gate
        # The family's router still runs: transformers records its output for output_router_logits
        # and the aux loss. Its first output is the logits in current transformers but the softmax
        # probabilities in 5.5, so the logits are recomputed here, as the family computes them
        # (DeepSeek in fp32): one more [T, D] x [D, E] product, small next to the experts.
        gate(flat_TD)
        weight = gate.weight
        if self.score_func == "sigmoid":
            router_logits = F.linear(flat_TD.float(), weight.float())
        else:
            router_logits = F.linear(flat_TD, weight)
        y_BLD, aux = self.moe(hidden_states, router_logits=router_logits)
        # routing statistics of the last call (expert counts, MaxVio) for logging, off the graph
        self.last_aux = replace(aux, loss=aux.loss.detach(), load_balance_loss=aux.load_balance_loss.detach(),
                                z_loss=aux.z_loss.detach(), router_entropy=aux.router_entropy.detach(),
                                seq_balance_loss=aux.seq_balance_loss.detach())
        return y_BLD + self._shared(hidden_states)

    def _shared(self, x_BLD: Tensor) -> Tensor | float:
        if not self.shared_names:
            return 0.0
        shared: Any = getattr(self, self.shared_names[0])
        y: Tensor = shared(x_BLD)
        if len(self.shared_names) > 1:  # Qwen2-MoE's sigmoid gate on the shared expert
            shared_gate: Any = getattr(self, self.shared_names[1])
            y = torch.sigmoid(shared_gate(x_BLD)) * y
        return y


def expert_parallelize(model: nn.Module, ctx: DistContext | None = None) -> nn.Module:
    """Replaces the MoE blocks of a transformers model, in place, by expert-parallel ones.

    Every rank must call it on an identical model (same weights). Returns the model.

    Raises:
        ValueError: the model's ``model_type`` is not a supported family or has no MoE block, or
            the number of experts is not divisible by the expert-parallel size.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    family = FAMILIES.get(str(model_type))
    blocks = [(name, m) for name, m in model.named_modules() if _is_moe_block(m)]
    if family is None or not blocks:
        raise ValueError(f"model_type {model_type!r} has no MoE block that expert_parallel recognises; "
                         f"supported families: {sorted(FAMILIES)}")
    ep_size = ctx.ep_size if ctx is not None else 1
    for name, block in blocks:
        E = block.experts.gate_up_proj.shape[0]
        if E % ep_size:
            raise ValueError(f"{name}: {E} experts are not divisible by the expert-parallel size {ep_size}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExpertParallelBlock(block, family, config, ctx))
    return model


def from_pretrained(path: str | Path, ctx: DistContext | None = None, **kwargs: Any) -> nn.Module:
    """Loads a local transformers checkpoint directly into the expert-parallel layout.

    Each rank reads only its own experts' tensors from the safetensors files (per-expert keys as
    transformers writes them, or slices of fused ``gate_up_proj`` / ``down_proj``); the model is built
    with its expert parameters on the meta device, so no rank ever holds every expert. ``kwargs`` go
    to ``AutoModelForCausalLM.from_config`` (e.g. ``attn_implementation``, ``dtype``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    family = FAMILIES.get(str(config.model_type))
    if family is None:
        raise ValueError(f"model_type {config.model_type!r} has no MoE block that expert_parallel "
                         f"recognises; supported families: {sorted(FAMILIES)}")
    with _experts_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    files = _SafetensorsDir(Path(path), str(config.model_type))
    missing, unexpected = model.load_state_dict(files.non_expert_tensors(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))
               and k not in tied]
    if tied:
        model.tie_weights()  # the head shares the embedding again (load_state_dict replaced neither)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit {type(model).__name__}: missing {missing}, "
                         f"unexpected {unexpected}")
    ep_size, ep_rank = (ctx.ep_size, ctx.ep_rank) if ctx is not None else (1, 0)
    for name, block in [(n, m) for n, m in model.named_modules() if _is_moe_block(m)]:
        E = block.experts.gate_up_proj.shape[0]
        if E % ep_size:
            raise ValueError(f"{name}: {E} experts are not divisible by the expert-parallel size {ep_size}")
        count = E // ep_size
        local = files.experts(name, ep_rank * count, count)
        parent_name, _, child = name.rpartition(".")
        new_block = ExpertParallelBlock(block, family, config, ctx, local)
        setattr(model.get_submodule(parent_name), child, new_block)
    return model


@contextlib.contextmanager
def _experts_on_meta() -> Iterator[None]:
    """While active, parameters named gate_up_proj / down_proj are created on the meta device
    (transformers has no switch for a part of a model; accelerate's init_empty_weights does the
    same for every parameter)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and name in ("gate_up_proj", "down_proj"):
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class _SafetensorsDir:
    """The tensors of a transformers checkpoint directory, read key by key (safetensors)."""

    # per-expert keys on disk: (gate, up, down) names of each family's expert linears
    EXPERT_NAMES: ClassVar[dict[str, tuple[str, str, str]]] = {"mixtral": ("w1", "w3", "w2")}
    DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, path: Path, model_type: str) -> None:
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.exists():  # sharded: the files the index names (not stray ones beside them)
            import json

            self.files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            self.files = sorted(path.glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{path} has no .safetensors files")
        self.where: dict[str, Path] = {}
        for file in self.files:
            with safe_open(str(file), "pt") as f:
                self.where.update(dict.fromkeys(f.keys(), file))
        self.names = self.EXPERT_NAMES.get(model_type, self.DEFAULT_NAMES)
        self.rename = (".block_sparse_moe.", ".mlp.") if model_type == "mixtral" else None

    def _internal(self, key: str) -> str:
        return key.replace(*self.rename) if self.rename else key

    def non_expert_tensors(self) -> dict[str, Tensor]:
        """Every tensor except the experts', under the model's (internal) names."""
        import re

        from safetensors import safe_open
        expert = re.compile(r"\.experts\.(\d+\.|gate_up_proj$|down_proj$)")
        out: dict[str, Tensor] = {}
        for file in self.files:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    if not expert.search(key):
                        out[self._internal(key)] = f.get_tensor(key)
        return out

    def experts(self, block: str, first: int, count: int) -> tuple[Tensor, Tensor]:
        """gate_up [count, 2F, D] and down [count, D, F] of experts [first, first + count) of
        ``block`` (internal name), read without touching the other experts' bytes."""
        from safetensors import safe_open
        disk = {self._internal(k): k for k in self.where}
        fused = f"{block}.experts.gate_up_proj"
        if fused in disk:  # a checkpoint in transformers' internal layout: slice the fused tensors
            tensors = []
            for name in (fused, f"{block}.experts.down_proj"):
                with safe_open(str(self.where[disk[name]]), "pt") as f:
                    tensors.append(f.get_slice(disk[name])[first:first + count])
            return tensors[0], tensors[1]
        gate_ups, downs = [], []
        for i in range(first, first + count):
            parts = []
            for part in self.names:
                key = disk[f"{block}.experts.{i}.{part}.weight"]
                with safe_open(str(self.where[key]), "pt") as f:
                    parts.append(f.get_tensor(key))
            gate_ups.append(torch.cat(parts[:2], dim=0))
            downs.append(parts[2])
        return torch.stack(gate_ups), torch.stack(downs)


def hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unmodified model's state dict (transformers' internal layout), every expert gathered; copies.

    A collective over each block's expert-parallel group: every rank calls it, every rank gets it.
    """
    # A snapshot on the host (not views, nor a second copy of the model on the GPU).
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    for name, block in model.named_modules():
        if not isinstance(block, ExpertParallelBlock):
            continue
        prefix = f"{name}." if name else ""
        full = {k: v.cpu() for k, v in block.moe.full_state_dict().items()}  # NOTE: collective
        state = {k: v for k, v in state.items() if not k.startswith(prefix + "moe.")}
        # ours [E, D, F] / [E, F, D] -> transformers' rows: gate_up_proj [E, 2F, D], down_proj [E, D, F]
        gate_up = torch.cat([full["experts.w_gate"], full["experts.w_in"]], dim=2).transpose(1, 2)
        state[prefix + "experts.gate_up_proj"] = gate_up.contiguous()
        state[prefix + "experts.down_proj"] = full["experts.w_out"].transpose(1, 2).contiguous()
    return state


def save_pretrained(model: nn.Module, path: str | Path, ctx: DistContext | None = None,
                    **kwargs: Any) -> None:
    """Writes a directory that plain transformers loads (``AutoModelForCausalLM.from_pretrained``),
    without expert_parallel installed: the experts gathered into the family's layout, DeepSeek's
    trained bias in ``e_score_correction_bias``. Every rank calls it; rank 0 writes.

    ``kwargs`` go to transformers' ``save_pretrained`` (e.g. ``max_shard_size``).
    """
    state = hf_state_dict(model)
    leader = ctx is None or ctx.rank == 0
    save: Any = model.save_pretrained
    save(str(path), state_dict=state, is_main_process=leader, **kwargs)
    if ctx is not None and ctx.world_size > 1:
        dist.barrier()  # NOTE: collective: the directory is complete when any rank returns


__all__ = ["FAMILIES", "ExpertParallelBlock", "expert_parallelize", "from_pretrained", "hf_state_dict",
           "save_pretrained"]
