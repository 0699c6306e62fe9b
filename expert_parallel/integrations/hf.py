"""Hugging Face transformers MoE models, expert-parallel with no change to the model code.

``expert_parallelize(model, ctx)`` finds the sparse MoE blocks of the supported families and
replaces each, in place, with an :class:`ExpertParallelBlock`: the family's own router module (kept,
so ``output_router_logits`` recording and HF's aux loss work as before; its logits feed our routing),
an ``ep.MoE`` configured with the family's routing semantics that holds this rank's E / ep_size
experts (converted from transformers' fused ``gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F],
or gpt-oss's interleaved [E, D, 2F] and [E, F, D] with biases), and the family's shared experts,
replicated. Attention, dense layers and embeddings are untouched.

Families (``config.model_type``): mixtral, qwen2_moe, qwen3_moe, olmoe, qwen3_next (softmax top-k),
deepseek_v3, glm4_moe (sigmoid, groups, expert bias), gpt_oss (router bias, expert biases, clamped
SwiGLU, interleaved gate/up columns).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..comm.distributed import DistContext
from ..config import MoEConfig
from ..layer import MoE
from ..ops.losses import MoEAux
from .ddp import prepare_ddp
from .hf_generate import generate_in_join

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("expert_parallel.hf needs transformers: install the extra with "
                      "pip install \"expert-parallel[hf]\"") from err


class ExpertLayout:
    """How a family stores its experts (transformers' fused tensors), and the conversion to and from
    ours (``w_gate``, ``w_in`` [E, D, F], ``w_out`` [E, F, D], biases ``b_gate``, ``b_in`` [E, F],
    ``b_out`` [E, D])."""

    names: ClassVar[tuple[str, ...]]
    """The expert tensors of the family's ``experts`` module (all indexed by expert first)."""

    def sizes(self, experts: Any) -> tuple[int, int, int]:
        """(E, D, F) of the family's experts module."""
        raise NotImplementedError

    def to_ours(self, hf: dict[str, Tensor]) -> dict[str, Tensor]:
        """Our expert tensors from the family's (any leading rows: all experts, or this rank's)."""
        raise NotImplementedError

    def to_hf(self, ours: dict[str, Tensor]) -> dict[str, Tensor]:
        """The family's expert tensors from ours (contiguous copies)."""
        raise NotImplementedError


class HalvesLayout(ExpertLayout):
    """transformers' usual layout: ``gate_up_proj`` [E, 2F, D] (the gate's F rows, then the up
    projection's) and ``down_proj`` [E, D, F], applied as ``linear(x, W) = x @ W.T``."""

    names = ("gate_up_proj", "down_proj")

    def sizes(self, experts: Any) -> tuple[int, int, int]:
        E, twoF, D = experts.gate_up_proj.shape
        return E, D, twoF // 2

    def to_ours(self, hf: dict[str, Tensor]) -> dict[str, Tensor]:
        gate_up, down = hf["gate_up_proj"], hf["down_proj"]  # [e, 2F, D], [e, D, F]
        F = gate_up.shape[1] // 2
        return {"w_gate": gate_up[:, :F].transpose(1, 2), "w_in": gate_up[:, F:].transpose(1, 2),
                "w_out": down.transpose(1, 2)}

    def to_hf(self, ours: dict[str, Tensor]) -> dict[str, Tensor]:
        gate_up = torch.cat([ours["w_gate"], ours["w_in"]], dim=2).transpose(1, 2)
        return {"gate_up_proj": gate_up.contiguous(), "down_proj": ours["w_out"].transpose(1, 2).contiguous()}


class InterleavedLayout(ExpertLayout):
    """gpt-oss: ``gate_up_proj`` [E, D, 2F] whose gate and up columns alternate (gate ``[..., ::2]``,
    up ``[..., 1::2]``), ``gate_up_proj_bias`` [E, 2F] alike, ``down_proj`` [E, F, D] and
    ``down_proj_bias`` [E, D], applied as ``x @ W + b``."""

    names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

    def sizes(self, experts: Any) -> tuple[int, int, int]:
        E, D, twoF = experts.gate_up_proj.shape
        return E, D, twoF // 2

    def to_ours(self, hf: dict[str, Tensor]) -> dict[str, Tensor]:
        gate_up, bias = hf["gate_up_proj"], hf["gate_up_proj_bias"]
        return {"w_gate": gate_up[..., ::2], "w_in": gate_up[..., 1::2], "w_out": hf["down_proj"],
                "b_gate": bias[:, ::2], "b_in": bias[:, 1::2], "b_out": hf["down_proj_bias"]}

    def to_hf(self, ours: dict[str, Tensor]) -> dict[str, Tensor]:
        def interleave(gate: Tensor, up: Tensor) -> Tensor:  # [..., F] twice -> [..., 2F]
            return torch.stack([gate, up], dim=-1).flatten(-2)

        return {"gate_up_proj": interleave(ours["w_gate"], ours["w_in"]),
                "gate_up_proj_bias": interleave(ours["b_gate"], ours["b_in"]),
                "down_proj": ours["w_out"].contiguous(), "down_proj_bias": ours["b_out"].contiguous()}


HALVES, INTERLEAVED = HalvesLayout(), InterleavedLayout()
EXPERT_TENSORS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")  # every layout's


@dataclass(frozen=True)
class Family:
    """How a transformers model family routes and stores its experts (what differs between them)."""

    score_func: str
    shared: tuple[str, ...] = ()  # attribute names of the block's shared-expert modules, in call order
    expert_bias: bool = False  # DeepSeek's e_score_correction_bias
    router: str = "gate"  # attribute name of the block's router module
    router_bias: bool = False  # the router's logits are x @ W.T + b (gpt-oss)
    layout: ExpertLayout = HALVES
    activation: str | None = None  # None: from config.hidden_act (silu -> swiglu, gelu -> geglu)
    returns_scores: bool = False  # the block returns (y, the router's top-k scores) (gpt-oss)

    def routing(self, config: Any) -> dict[str, Any]:
        """MoEConfig routing fields from the model's config."""
        fields: dict[str, Any] = {"score_func": self.score_func, "router_bias": self.router_bias,
                                  "normalize_topk": bool(getattr(config, "norm_topk_prob", True))}
        if self.score_func == "sigmoid":  # DeepSeek-V3, GLM-4.5
            fields.update(route_scale=float(config.routed_scaling_factor))
            if getattr(config, "n_group", None) and getattr(config, "topk_group", None):
                fields.update(num_expert_groups=config.n_group, num_limited_groups=config.topk_group)
        if self.expert_bias:
            fields["bias_update_rate"] = 1e-3  # DeepSeek-V3's γ; the bias itself is the model's buffer
        return fields

    def expert_fields(self, config: Any, experts: Any) -> dict[str, Any]:
        """MoEConfig expert fields (activation, biases) from the model's config and experts module."""
        if self.activation == "clamped_swiglu":  # gpt-oss: the experts' own alpha and limit (from the
            # config in current transformers; 5.5 fixes them at 1.702 and 7.0 whatever the config says)
            alpha = experts.alpha if hasattr(experts, "alpha") else config.swiglu_alpha
            limit = experts.limit if hasattr(experts, "limit") else config.swiglu_limit
            return {"activation": "clamped_swiglu", "bias": True, "swiglu_alpha": float(alpha),
                    "swiglu_limit": float(limit)}
        activation = _ACTIVATIONS.get(str(config.hidden_act))
        if activation is None:
            raise ValueError(f"hidden_act={config.hidden_act!r} of model_type {config.model_type!r} is not "
                             f"supported: expected one of {sorted(_ACTIVATIONS)}")
        return {"activation": activation}


FAMILIES = {
    "mixtral": Family("softmax"),
    "qwen3_moe": Family("softmax"),
    "olmoe": Family("softmax"),
    "qwen2_moe": Family("softmax", ("shared_expert", "shared_expert_gate")),
    "qwen3_next": Family("softmax", ("shared_expert", "shared_expert_gate")),
    "deepseek_v3": Family("sigmoid", ("shared_experts",), expert_bias=True),
    "glm4_moe": Family("sigmoid", ("shared_experts",), expert_bias=True),
    "gpt_oss": Family("softmax", router="router", router_bias=True, layout=INTERLEAVED,
                      activation="clamped_swiglu", returns_scores=True),
}
_ACTIVATIONS = {"silu": "swiglu", "gelu": "geglu"}  # transformers' hidden_act -> our gated activation


def _is_moe_block(module: nn.Module, family: Family) -> bool:
    experts = getattr(module, "experts", None)
    router = getattr(module, family.router, None)
    return (hasattr(router, "weight") and hasattr(experts, "gate_up_proj")
            and hasattr(experts, "down_proj"))


def _moe_blocks(model: nn.Module, model_type: str) -> tuple[Family, list[tuple[str, Any]]]:
    """The family of ``model_type`` and the model's sparse MoE blocks (name, module).

    Raises ValueError naming the supported families when there is no such block.
    """
    family = FAMILIES.get(model_type)
    blocks = [(n, m) for n, m in model.named_modules() if _is_moe_block(m, family)] if family else []
    if family is None or not blocks:
        raise ValueError(f"model_type {model_type!r} has no MoE block that expert_parallel recognises; "
                         f"supported families: {sorted(FAMILIES)}")
    return family, blocks


def _local_count(name: str, block: Any, family: Family, ep_size: int) -> int:
    """Experts per rank of ``block``; ValueError if they do not divide evenly."""
    E = family.layout.sizes(block.experts)[0]
    if E % ep_size:
        raise ValueError(f"{name}: {E} experts are not divisible by the expert-parallel size {ep_size}")
    return E // ep_size


class ExpertParallelBlock(nn.Module):
    """A family's sparse MoE block with its experts sharded: same call signature and return value.

    Submodules: the family's router under its own name (``gate``; ``router`` for gpt-oss;
    replicated, called for its logits), ``moe`` (an ``ep.MoE`` whose ``router.weight`` is the
    family router's weight, whose ``router.bias`` is its bias (gpt-oss) and, for DeepSeek-V3 and
    GLM-4.5, whose ``router.expert_bias`` is its ``e_score_correction_bias``), and the family's shared
    experts under their own names.
    """

    def __init__(self, block: Any, family: Family, config: Any, ctx: DistContext | None,
                 local: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        experts: Any = block.experts
        E, D, F = family.layout.sizes(experts)
        self.router_name, self.layout = family.router, family.layout
        self.score_func, self.returns_scores = family.score_func, family.returns_scores
        setattr(self, family.router, getattr(block, family.router))
        self.last_aux: MoEAux | None = None
        self.router_gives_logits: bool | None = None  # decided at the first eager call
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        for name in family.shared:
            setattr(self, name, getattr(block, name))
        self.shared_names = family.shared
        cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=int(config.num_experts_per_tok),
                        capacity_factor=None, eval_capacity_factor=None, load_balance_coef=0.0,
                        z_loss_coef=0.0, dtype=experts.gate_up_proj.dtype, **family.routing(config),
                        **family.expert_fields(config, experts))
        device = self.family_router().weight.device
        with torch.random.fork_rng(devices=[]):  # the user's generator untouched
            torch.default_generator.manual_seed(0)  # the CPU generator only: GPU seeds stay the user's
            # Built on the meta device and given storage without drawing anything: its experts are
            # this rank's rows of the model's own (below) and its router is the family's.
            moe = (MoE(cfg, ep_group=ctx.ep_group, device="meta") if ctx is not None
                   else MoE(cfg, device="meta"))  # no ep_group given: one device
            self.moe = moe.to_empty(device=device)
        with torch.no_grad():
            for buffer in self.moe.buffers():  # the balancing counts and bias start at zero
                buffer.zero_()
        first, count = self.moe.experts.first, self.moe.experts.num_local
        if local is None:  # this rank's rows of the model's own expert tensors
            local = {name: getattr(experts, name).detach()[first:first + count] for name in self.layout.names}
        self._adopt(local)
        self.moe.check_replicas()  # the model's router (and bias) must agree across the group

    def family_router(self) -> Any:
        """The family's own router module (``gate``, or ``router`` for gpt-oss)."""
        return getattr(self, self.router_name)

    def _adopt(self, local: dict[str, Tensor]) -> None:
        """The router's weight (and biases) shared; this rank's experts (the family's layout)
        converted and copied."""
        self._share_router()
        mine = self.moe.experts.weights()
        with torch.no_grad():
            for name, value in self.layout.to_ours(local).items():
                mine[name].copy_(value)

    def _share_router(self) -> None:
        """One tensor each: the family router's weight (and bias) are ours; DeepSeek's and GLM's
        e_score_correction_bias is our expert_bias, so update_expert_bias trains the model's own."""
        router, ours = self.family_router(), self.moe.router
        ours.weight = router.weight
        if ours.bias is not None:
            ours.bias = router.bias
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None and getattr(ours, "expert_bias", None) is not None:
            ours.expert_bias = bias

    def _apply(self, fn: Any, recurse: bool = True) -> ExpertParallelBlock:
        # The bias stays fp32 (a bf16 bias would swallow updates of 1e-3): moved, never cast.
        router = self.family_router()
        bias = getattr(router, "e_score_correction_bias", None)
        super()._apply(fn, recurse)
        if bias is not None:
            router.e_score_correction_bias = bias.to(fn(bias[:0]).device)
        self._share_router()  # conversions may swap parameters: share again
        return self

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """[B, L, D] -> [B, L, D] (gpt-oss: and the router's top-k scores [B·L, K]), as the family's
        block."""
        if self.training and self.jitter_noise > 0:  # Mixtral: both router and experts see it
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        flat_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        # The family's router still runs: transformers records its output for output_router_logits
        # and the aux loss. Its (first) output is used as our logits when it is them.
        routed = self.family_router()(flat_TD)
        y_BLD, aux = self.moe(hidden_states, router_logits=self._router_logits(flat_TD, routed))
        # routing statistics of the last call (expert counts, MaxVio) for logging, off the graph
        self.last_aux = replace(aux, loss=aux.loss.detach(), load_balance_loss=aux.load_balance_loss.detach(),
                                z_loss=aux.z_loss.detach(), router_entropy=aux.router_entropy.detach(),
                                seq_balance_loss=aux.seq_balance_loss.detach())
        y_BLD = y_BLD + self._shared(hidden_states)
        return (y_BLD, routed[1]) if self.returns_scores else y_BLD

    def _router_logits(self, x_TD: Tensor, routed: Any) -> Tensor:
        """The router logits [T, E]: the family router's (first) output where it is exactly the
        logits, as in transformers 5.25 (checked bitwise at the first eager call, a host read once
        per block); else computed again (transformers 5.5's routers return softmax probabilities:
        one more [T, D] x [D, E] product, small next to the experts)."""
        first = routed if isinstance(routed, Tensor) else routed[0]
        if (self.router_gives_logits is None and not torch.compiler.is_compiling()
                and isinstance(first, Tensor) and first.numel() > 0):  # an empty batch proves nothing
            # Off the graph, so that this first call saves for the backward what the later ones
            # (and activation checkpointing's recomputation of this one) save.
            with torch.no_grad():
                mine = self._logits(x_TD)
            self.router_gives_logits = (first.shape == mine.shape and first.dtype == mine.dtype
                                        and torch.equal(first, mine))
        return first if self.router_gives_logits else self._logits(x_TD)

    def _logits(self, x_TD: Tensor) -> Tensor:
        """The router logits [T, E] as the family computes them."""
        router = self.family_router()
        if self.score_func == "sigmoid":
            return F.linear(x_TD.float(), router.weight.float())
        return F.linear(x_TD, router.weight, router.bias if self.moe.cfg.router_bias else None)

    def _shared(self, x_BLD: Tensor) -> Tensor | float:
        if not self.shared_names:
            return 0.0
        shared: Any = getattr(self, self.shared_names[0])
        y: Tensor = shared(x_BLD)
        if len(self.shared_names) > 1:  # Qwen2-MoE's and Qwen3-Next's sigmoid gate on the shared expert
            shared_gate: Any = getattr(self, self.shared_names[1])
            y = torch.sigmoid(shared_gate(x_BLD)) * y
        return y


def expert_parallelize(model: nn.Module, ctx: DistContext | None = None) -> nn.Module:
    """Replaces the MoE blocks of a transformers model, in place, by expert-parallel ones.

    Every rank must call it on an identical model (same weights). Returns the model, ready for any
    DistributedDataParallel wrapper (Trainer's, accelerate's, yours: see :func:`ep.prepare_ddp`).

    Raises:
        ValueError: the model's ``model_type`` is not a supported family or has no MoE block, or
            the number of experts is not divisible by the expert-parallel size.
    """
    config = getattr(model, "config", None)
    family, blocks = _moe_blocks(model, str(getattr(config, "model_type", type(model).__name__)))
    ep_size = ctx.ep_size if ctx is not None else 1
    for name, block in blocks:
        _local_count(name, block, family, ep_size)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExpertParallelBlock(block, family, config, ctx))
    if ctx is not None:
        prepare_ddp(model, ctx)  # any DDP wrapper (Trainer's, accelerate's, yours) leaves the experts to us
    _guard_save_pretrained(model)
    _generate_joined(model)  # ranks that stop decoding at different steps serve the others
    return model


def from_pretrained(path: str | Path, ctx: DistContext | None = None, **kwargs: Any) -> nn.Module:
    """Loads a local transformers checkpoint directly into the expert-parallel layout.

    Each rank reads only its own experts' tensors from the safetensors files (per-expert keys as
    transformers writes them, or slices of fused ``gate_up_proj`` / ``down_proj`` (and gpt-oss's
    biases)); the model is built with its expert parameters on the meta device, so no rank ever holds
    every expert. ``kwargs`` go to ``AutoModelForCausalLM.from_config`` (e.g. ``attn_implementation``,
    ``dtype``).

    Raises:
        ValueError: an unsupported family, a quantised checkpoint (FP8 scales, MXFP4, a
            ``quantization_config``: dequantise first), a checkpoint that does not fit the model
            (beyond the keys the model class tells transformers to ignore), or experts not
            divisible by the EP size.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such directory (ep.hf.from_pretrained reads a local "
                                "transformers checkpoint; nothing is downloaded)")
    config = AutoConfig.from_pretrained(path)
    if str(config.model_type) not in FAMILIES:
        raise ValueError(f"model_type {config.model_type!r} has no MoE block that expert_parallel "
                         f"recognises; supported families: {sorted(FAMILIES)}")
    with _experts_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    family, blocks = _moe_blocks(model, str(config.model_type))
    files = _SafetensorsDir(Path(path), str(config.model_type))
    files.check_not_quantized(config)
    _load_replicated(model, files)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # the head shares the embedding again (load_state_dict replaced neither)
    ep_size, ep_rank = (ctx.ep_size, ctx.ep_rank) if ctx is not None else (1, 0)
    for name, block in blocks:
        count = _local_count(name, block, family, ep_size)
        local = files.experts(name, ep_rank * count, count, family.layout)
        parent_name, _, child = name.rpartition(".")
        new_block = ExpertParallelBlock(block, family, config, ctx, local)
        setattr(model.get_submodule(parent_name), child, new_block)
    if ctx is not None:
        prepare_ddp(model, ctx)
    _guard_save_pretrained(model)
    _generate_joined(model)  # ranks that stop decoding at different steps serve the others
    return model


def _is_expert_key(key: str) -> bool:
    """A state-dict key of the experts: transformers' fused tensors, or anything of our ``moe``
    (its router's tensors are the family router's, loaded under the router's own names)."""
    return ".moe." in key or key.endswith(tuple(f"experts.{n}" for n in EXPERT_TENSORS))


def _load_replicated(model: nn.Module, files: _SafetensorsDir) -> None:
    """Every tensor of a checkpoint but the experts' into the model, in place, under the model's
    names (Mixtral's ``block_sparse_moe`` on disk is ``mlp``): routers, their biases, shared experts,
    attention, norms, embeddings.

    Raises:
        ValueError: the checkpoint lacks a tensor of the model (experts and a tied head aside) or
            has one the model lacks (beyond the model class's
            ``_keys_to_ignore_on_load_unexpected``: multi-token-prediction layers).
    """
    ignore = tuple(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    known = set(model.state_dict())
    missing, unexpected = model.load_state_dict(files.non_expert_tensors(ignore, known), strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if not _is_expert_key(k) and k not in tied]
    if missing or unexpected:
        raise ValueError(f"{files.path}: checkpoint does not fit {type(model).__name__}: missing "
                         f"{missing}, unexpected {unexpected}")


@contextlib.contextmanager
def _experts_on_meta() -> Iterator[None]:
    """While active, the experts' parameters (gate_up_proj, down_proj and gpt-oss's biases) that this
    thread creates are created on the meta device (transformers has no switch for a part of a model).

    torch's parameter-registration hook, not a patch of ``nn.Module.register_parameter`` (what
    accelerate's init_empty_weights does): it is removed by its own handle on every exit, whatever
    the order in which nested or concurrent uses end, and modules built by other threads meanwhile
    are left alone."""
    thread = threading.get_ident()

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or name not in EXPERT_TENSORS or threading.get_ident() != thread:
            return None  # None: registered as given
        return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    # (torch types the hook as returning None; it documents that a returned parameter replaces it)
    handle = nn.modules.module.register_module_parameter_registration_hook(to_meta)  # type: ignore[arg-type]
    try:
        yield
    finally:
        handle.remove()


class _SafetensorsDir:
    """The tensors of a transformers checkpoint directory, read key by key (safetensors)."""

    # per-expert keys on disk: (gate, up, down) names of each family's expert linears
    EXPERT_NAMES: ClassVar[dict[str, tuple[str, str, str]]] = {"mixtral": ("w1", "w3", "w2")}
    DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, path: Path, model_type: str) -> None:
        from safetensors import safe_open

        self.path = path
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

    # key endings of quantised checkpoints: FP8 block scales (DeepSeek-V3, GLM-4.5 FP8 releases,
    # transformers' fine-grained FP8), per-tensor FP8 scales, MXFP4 blocks and scales (gpt-oss)
    QUANTIZED: ClassVar[dict[str, str]] = {
        "_scale_inv": "FP8 (block scales)", "weight_scale": "FP8 (weight scales)",
        "input_scale": "FP8 (activation scales)", "_blocks": "MXFP4", "_scales": "MXFP4"}

    def check_not_quantized(self, config: Any) -> None:
        """ValueError for a quantised checkpoint (a ``quantization_config``, FP8 scales, MXFP4
        blocks), which this reader does not dequantise: one message naming the format and the
        dequantise-first recipe."""
        quant = getattr(config, "quantization_config", None)
        where = ""
        if quant is not None:
            method = (quant.get("quant_method") if isinstance(quant, dict)
                      else getattr(quant, "quant_method", quant))
            where = f"its config has a quantization_config (quant_method {method!r})"
        else:
            for key in sorted(self.where):
                fmt = next((f for end, f in self.QUANTIZED.items() if key.endswith(end)), None)
                if fmt is not None:
                    where = f"{fmt}: {key}"
                    break
        if where:
            raise ValueError(
                f"this checkpoint is quantised ({where}); ep.hf.from_pretrained reads unquantised "
                "weights only. Dequantise first: load it with transformers and a dequantising config "
                "(FineGrainedFP8Config(dequantize=True) for FP8, Mxfp4Config(dequantize=True) for "
                "MXFP4), then either call ep.hf.expert_parallelize on that model or save_pretrained it "
                "and load the saved directory here")

    def non_expert_tensors(self, ignore: list[str] | tuple[str, ...] = (),
                           known: set[str] | None = None) -> dict[str, Tensor]:
        """Every tensor except the experts', under the model's (internal) names; a tensor the model
        does not have (not in ``known``) that matches an ``ignore`` pattern (the model class's
        ``_keys_to_ignore_on_load_unexpected``: multi-token-prediction layers) is skipped, as
        transformers skips it (only unexpected keys: GLM-4.5's pattern for its MTP layer 92 also
        names its real layer 46)."""
        import re

        from safetensors import safe_open
        expert = re.compile(r"\.experts\.(\d+\.|(gate_up_proj|down_proj)(_bias)?$)")
        out: dict[str, Tensor] = {}
        for file in self.files:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    name = self._internal(key)
                    unexpected = known is not None and name not in known
                    if expert.search(key) or (unexpected and any(re.search(p, key) for p in ignore)):
                        continue
                    out[name] = f.get_tensor(key)
        return out

    def experts(self, block: str, first: int, count: int, layout: ExpertLayout) -> dict[str, Tensor]:
        """The expert tensors (``layout.names``, the family's layout) of experts [first, first + count)
        of ``block`` (internal name), read without touching the other experts' bytes."""
        from safetensors import safe_open
        disk = {self._internal(k): k for k in self.where}
        if f"{block}.experts.gate_up_proj" in disk:  # transformers' internal layout: slice the fused
            tensors = {}
            for name in layout.names:
                key = disk[f"{block}.experts.{name}"]
                with safe_open(str(self.where[key]), "pt") as f:
                    tensors[name] = f.get_slice(key)[first:first + count]
            return tensors
        if layout is not HALVES:
            raise ValueError(f"the checkpoint has no {block}.experts.gate_up_proj")
        gate_ups, downs = [], []
        for i in range(first, first + count):
            parts = []
            for part in self.names:
                key = disk[f"{block}.experts.{i}.{part}.weight"]
                with safe_open(str(self.where[key]), "pt") as f:
                    parts.append(f.get_tensor(key))
            gate_ups.append(torch.cat(parts[:2], dim=0))
            downs.append(parts[2])
        return {"gate_up_proj": torch.stack(gate_ups), "down_proj": torch.stack(downs)}


ONE_RANK_SAVE = ("save_pretrained of an expert-parallel model on one rank: this rank holds only its own "
                 "experts. Call ep.hf.save_pretrained(model, directory, ctx) on every rank (it gathers "
                 "the experts; rank 0 writes); under transformers.Trainer, pass "
                 "callbacks=[ep.hf.ExpertParallelCallback(ctx)], which gathers them on every rank when a "
                 "save is due, so that trainer.save_model and Trainer's checkpoints work")

# Models gathered into transformers' layout by keep_for_save, on the rank that writes, with the
# parameters' version stamp at that time (a state dict is only written while it is current).
_KEPT: weakref.WeakKeyDictionary[nn.Module, tuple[dict[str, Tensor], int]] = weakref.WeakKeyDictionary()


def _version_stamp(model: nn.Module) -> int:
    """Changes whenever a parameter or buffer is modified in place (an optimizer step, a load)."""
    return sum(t._version for t in (*model.parameters(), *model.buffers()))


def _is_spread(model: nn.Module) -> bool:
    """Whether the model's experts are spread over more than one rank."""
    return any(isinstance(m, ExpertParallelBlock) and m.moe.ep_size > 1 for m in model.modules())


def keep_for_save(model: nn.Module, ctx: DistContext, keep: bool | None = None,
                  only_rank0: bool | None = None) -> None:
    """Gathers the model into transformers' layout now (a collective: every rank calls it) and keeps
    it where ``keep`` (default: on rank 0): the next ``model.save_pretrained`` there without a state
    dict writes it while the parameters are unchanged (what Trainer's saves on one rank need).

    ``only_rank0`` (default: ``keep`` not given): gathered onto rank 0 only, so the other ranks hold
    nothing more; else every rank gathers it (saves on every node)."""
    from .hf_export import hf_state_dict

    only_rank0 = keep is None if only_rank0 is None else only_rank0
    state = hf_state_dict(model, to_rank=0 if only_rank0 else None)
    _KEPT.pop(model, None)
    if (ctx.rank == 0) if keep is None else keep:
        _KEPT[model] = (state, _version_stamp(model))


def forget_kept(model: nn.Module) -> None:
    """Drops the state :func:`keep_for_save` kept (its host memory)."""
    _KEPT.pop(model, None)


def matches_checkpoint(model: nn.Module, path: str | Path) -> bool:
    """Whether every tensor of a transformers checkpoint directory that transformers'
    ``load_state_dict`` loads by name (its name on disk is one of the model's) equals the model's,
    bitwise: the check that the directory is the one Trainer loaded. False when none is."""
    from safetensors import safe_open

    files = _SafetensorsDir(Path(path), str(getattr(model.config, "model_type", "")))
    own = {k: v for k, v in model.state_dict().items() if not _is_expert_key(k)}
    compared = 0
    for file in files.files:
        with safe_open(str(file), "pt") as f:
            for key in (k for k in f.keys() if k in own):  # noqa: SIM118 (not iterable)
                if not torch.equal(f.get_tensor(key), own[key].detach().cpu()):
                    return False
                compared += 1
    return compared > 0


def save_pretrained_in_hf_layout(self: nn.Module, save_directory: str | Path, *args: Any,
                                 state_dict: dict[str, Tensor] | None = None, **kwargs: Any) -> Any:
    """transformers' ``save_pretrained`` for an expert-parallel model, in transformers' layout: the
    gathered state kept by :func:`keep_for_save` while current, the model's own in one process; on
    one rank of many without one, a RuntimeError at once (it cannot gather: the other ranks are not
    in the call)."""
    if state_dict is None or any(".moe." in key for key in state_dict):  # our internal layout
        kept = _KEPT.get(self)
        if kept is not None and kept[1] == _version_stamp(self):
            state_dict = kept[0]
        elif _is_spread(self):
            raise RuntimeError(ONE_RANK_SAVE)
        else:
            from .hf_export import hf_state_dict

            state_dict = hf_state_dict(self)  # one process: every expert is here
    save: Any = getattr(type(self), "save_pretrained")  # noqa: B009 (transformers' own, of the class)
    return save(self, save_directory, *args, state_dict=state_dict, **kwargs)


class _ModelMethod:
    """A method of one expert-parallel model set on the model (``save_pretrained``, ``generate``):
    ``fn(model, ...)``. An object holding its model, not a bound method, so that a deepcopy of the
    model calls ``fn`` with the copy and the model still pickles."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        self.model, self.fn = model, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.model, *args, **kwargs)


def _guard_save_pretrained(model: nn.Module) -> None:
    """``model.save_pretrained`` writes transformers' layout (:func:`save_pretrained_in_hf_layout`)."""
    model.save_pretrained = _ModelMethod(model, save_pretrained_in_hf_layout)  # type: ignore[assignment]


def _generate_joined(model: nn.Module) -> None:
    """``model.generate`` runs inside ``ep.join`` (:func:`generate_in_join`); a model without
    ``generate``: nothing."""
    if callable(getattr(type(model), "generate", None)):
        model.generate = _ModelMethod(model, generate_in_join)  # type: ignore[assignment]


def load_hf_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Every tensor of an expert-parallel model read from a transformers checkpoint directory
    (safetensors) in place: the replicated ones all (routers, shared experts, attention, norms,
    embeddings, DeepSeek's bias), the experts this rank's rows. What a Trainer resume or best-model
    reload needs: transformers' ``load_state_dict`` misses the experts (another layout) and, where
    the names on disk are not the model's (Mixtral's ``block_sparse_moe``), the routers too.

    Raises:
        ValueError: the checkpoint does not fit the model (a tensor missing on either side).
    """
    files = _SafetensorsDir(Path(path), str(getattr(model.config, "model_type", "")))
    _load_replicated(model, files)
    for name, block in model.named_modules():
        if isinstance(block, ExpertParallelBlock):
            first, count = block.moe.experts.first, block.moe.experts.num_local
            block._adopt(files.experts(name, first, count, block.layout))


__all__ = ["FAMILIES", "ExpertParallelBlock", "expert_parallelize", "from_pretrained"]
