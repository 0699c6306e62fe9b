"""Expert feed-forward networks: the grouped expert GEMMs and the dense FeedForward baseline.

Math only, no communication. Rows handed to the experts are ordered (source rank, local expert); ``counts_Re``
says how many rows each local expert owns.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ACTIVATIONS, GATED_ACTIVATIONS, SWIGLU_ALPHA, SWIGLU_LIMIT, MoEConfig
from .precision import autocast_off, compute_dtype
from .private import grouped_mm_op


def activate(h_ND: Tensor, activation: str) -> Tensor:
    """The activation of an ungated expert, or the gate's activation of a gated one."""
    if activation == "relu":
        return F.relu(h_ND)
    if activation in ("gelu", "geglu"):
        return F.gelu(h_ND)  # exact (erf) GELU
    return F.silu(h_ND)  # swiglu


Clamp = tuple[float, float]  # clamped_swiglu's (alpha, limit)


def glu(g_NF: Tensor, h_NF: Tensor, activation: str, clamp: Clamp = (SWIGLU_ALPHA, SWIGLU_LIMIT)) -> Tensor:
    """A gated activation from the gate ``g`` and up ``h`` projections: ``act(g) * h``, or for
    clamped_swiglu (gpt-oss), with g' = min(g, limit) and h' = clamp(h, -limit, limit),
    ``g' * sigmoid(alpha * g') * (h' + 1)``."""
    if activation == "clamped_swiglu":
        alpha, limit = clamp
        g_NF = g_NF.clamp(max=limit)
        return g_NF * torch.sigmoid(alpha * g_NF) * (h_NF.clamp(-limit, limit) + 1)
    return activate(g_NF, activation) * h_NF


def _seeded_generator(base_seed: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on (base_seed, index): layout-independent initialisation."""
    return torch.Generator().manual_seed((base_seed * 1_000_003 + index) % (2**63 - 1))


@dataclass(frozen=True)
class RngSnapshot:
    """The states of torch's generators that building a layer draws from: the CPU generator, and the
    CUDA generator of the device it is built for (a CUDA default device, or the meta device on a
    machine with CUDA, or wherever CUDA is in use already)."""

    cpu: Tensor
    cuda: Tensor | None = None
    cuda_index: int | None = None

    @staticmethod
    def take() -> RngSnapshot:
        default = torch.get_default_device()
        # A meta build takes the CUDA generator's state only where CUDA is in use already: taking
        # it would initialise CUDA in every job on a GPU machine, CPU ones included.
        if not torch.cuda.is_available() or not (default.type == "cuda" or torch.cuda.is_initialized()):
            return RngSnapshot(torch.get_rng_state())
        index = default.index if default.type == "cuda" and default.index is not None else (
            torch.cuda.current_device())
        return RngSnapshot(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)

    @contextlib.contextmanager
    def restored(self, device: torch.device) -> Iterator[None]:
        """Within: the generators as they were at the snapshot (``device``'s CUDA generator too);
        after: as they were before (the global random stream goes on undisturbed)."""
        cuda = [device] if device.type == "cuda" else []
        state = self.cuda
        if cuda and state is None:
            raise ValueError(f"reset_parameters on {device}: the layer was built without the CUDA "
                             f"generator's state; build it under torch.device('cuda') or "
                             f"torch.device('meta') on this machine")
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(self.cpu)
            if cuda and state is not None:
                torch.cuda.set_rng_state(state, device)
            yield


def draw_base_seed() -> int:
    """One draw from torch's global CPU generator (whatever the default device, the meta device
    included); every layer built afterwards draws a fresh one."""
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())  # NOTE: a CPU tensor, no device sync


def _init_ffn(d_model: int, d_ff: int, gated: bool, bias: bool, generator: torch.Generator | None,
              device: torch.device | str | None = None) -> dict[str, Tensor]:
    """One expert's weights in the dense layout (w_in [D, F], w_gate [D, F], w_out [F, D], biases),
    on ``device`` (default: the default device), drawn from ``generator`` (default: that device's)."""
    def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(shape, device=device).uniform_(-bound, bound, generator=generator)

    weights = {"w_in": uniform((d_model, d_ff), d_model)}
    if gated:
        weights["w_gate"] = uniform((d_model, d_ff), d_model)
    weights["w_out"] = uniform((d_ff, d_model), d_ff)
    if bias:
        weights["b_in"] = torch.zeros(d_ff, device=device)
        if gated:
            weights["b_gate"] = torch.zeros(d_ff, device=device)
        weights["b_out"] = torch.zeros(d_model, device=device)
    return weights


MatMul = Callable[[Tensor, Tensor], Tensor]


def _matmul(x: Tensor, w: Tensor) -> Tensor:
    return x @ w


def _add(h: Tensor, b: Tensor) -> Tensor:
    return h + b


def ffn(x_ND: Tensor, w: Mapping[str, Tensor], activation: str, mm: MatMul = _matmul,
        add_bias: MatMul = _add, clamp: Clamp = (SWIGLU_ALPHA, SWIGLU_LIMIT)) -> Tensor:
    """The expert MLP on rows: ``glu(x @ w_gate, x @ w_in) @ w_out`` or ``act(x @ w_in) @ w_out``.

    ``w`` holds the tensors by state-dict name (w_in, w_gate, w_out, b_in, b_gate, b_out); ``mm`` and
    ``add_bias`` let the grouped path use grouped_mm and per-row biases with the same formula;
    ``clamp`` is clamped_swiglu's (alpha, limit) (:func:`glu`).
    """
    h_NF = mm(x_ND, w["w_in"])
    if "b_in" in w:
        h_NF = add_bias(h_NF, w["b_in"])
    if activation in GATED_ACTIVATIONS:
        g_NF = mm(x_ND, w["w_gate"])
        if "b_gate" in w:
            g_NF = add_bias(g_NF, w["b_gate"])
        h_NF = glu(g_NF, h_NF, activation, clamp)
    else:
        h_NF = activate(h_NF, activation)
    y_ND = mm(h_NF, w["w_out"])
    if "b_out" in w:
        y_ND = add_bias(y_ND, w["b_out"])
    return y_ND


def _aligned(x_ND: Tensor, d_model: int, d_ff: int) -> bool:
    """Whether rows of D and F elements of x's dtype have the 16-byte strides grouped_mm needs."""
    align = 16 // x_ND.element_size()
    return d_model % align == 0 and d_ff % align == 0


def _torch_grouped_mm() -> Callable[..., Tensor] | None:
    """torch's grouped GEMM: ``F.grouped_mm`` (public from torch 2.10), ``torch._grouped_mm`` on
    2.8 and 2.9, None before (:func:`.private.grouped_mm_op`)."""
    return grouped_mm_op()


def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """``grouped_mm(x, w, offs=offs)`` of whichever name this torch has."""
    fn = _torch_grouped_mm()
    assert fn is not None, "torch < 2.8 has no grouped_mm"
    return fn(x, w, offs=offs)


@functools.cache
def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped_mm runs on this device in this dtype: probed once with a tiny product.

    torch < 2.8 has no grouped_mm at all; the CPU kernel (a C++ loop of one mm per group) exists from
    torch 2.10 on. A probe is the reliable test that it runs; :func:`fused_grouped_mm` says whether
    it runs fast on CUDA.
    """
    if _torch_grouped_mm() is None:
        return False
    try:
        x = torch.ones(16, 16, dtype=dtype, device=device)
        w = torch.ones(2, 16, 16, dtype=dtype, device=device)
        grouped_mm(x, w, torch.tensor([8, 16], dtype=torch.int32, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a failing kernel reports asynchronously
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


@torch.compiler.assume_constant_result  # compiled code takes the answer, not the probe, into its graph
def fused_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch runs its fused grouped-GEMM kernel here: CUDA, bf16, compute capability 9.0
    (Hopper) or 10.x (Blackwell). Elsewhere torch's grouped_mm falls back to copying the offsets to
    the host and looping one GEMM per group (a sync in every call), and the segment loop, which
    reuses the host counts the exchange already has, is the better path."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return ((major, minor) == (9, 0) or major == 10) and grouped_mm_works(device, dtype)


def _can_use_grouped_mm(x_ND: Tensor, d_model: int, d_ff: int) -> bool:
    # torch's fused CUDA grouped_mm (with its own backward) with 16-byte aligned strides.
    # Unaligned sizes fall back to the segment loop rather than being padded (a copy of every row).
    return x_ND.is_cuda and _aligned(x_ND, d_model, d_ff) and fused_grouped_mm(x_ND.device, x_ND.dtype)


@torch.compiler.assume_constant_result  # compiled code takes the answer, not the probe, into its graph
def _cpu_grouped_mm_runs(dtype: torch.dtype) -> bool:
    return grouped_mm_works(torch.device("cpu"), dtype)


def _can_use_cpu_grouped_mm(x_ND: Tensor, d_model: int, d_ff: int) -> bool:
    # Expert-major rows (one segment) only: grouped_mm has no out= to write several segments' groups
    # into one buffer. Strides must be row-major and multiples of 16 bytes.
    return (x_ND.device.type == "cpu" and x_ND.dtype in (torch.float32, torch.bfloat16)
            and _row_major(x_ND) and _aligned(x_ND, d_model, d_ff) and _cpu_grouped_mm_runs(x_ND.dtype))


def _row_major(t: Tensor) -> bool:
    """Whether a 2-D tensor has the strides grouped_mm accepts (``is_contiguous`` also allows any
    stride on empty or size-1 dimensions, such as the [0, 0] strides of an expanded gradient)."""
    return t.stride() == (t.shape[1], 1)


def _as_row_major(t: Tensor) -> Tensor:
    return t if _row_major(t) else t.new_empty(t.shape).copy_(t)


Segment = tuple[int, int, int]  # (first row, end row, local expert)


def segments(counts_Re: Tensor, counts_host: list[int] | None = None) -> list[Segment]:
    """The non-empty row ranges (segments) of rows ordered (source rank, local expert), with their experts.

    ``counts_host``: the same counts flattened, where the caller already has them on the host.
    NOTE: host-device sync otherwise: the row counts are needed on the host to slice the rows.
    """
    out, start = [], 0
    for index, size in enumerate(counts_Re.reshape(-1).tolist() if counts_host is None else counts_host):
        if size:
            out.append((start, start + size, index % counts_Re.shape[-1]))
            start += size
    return out


class _SegmentMM(torch.autograd.Function):
    """y[a:b] = x[a:b] @ w[j] for every segment (a, b, j): a grouped GEMM whose groups may repeat.

    Written out because torch's CPU grouped_mm has no backward (torch 2.13) and needs aligned,
    expert-major groups. Each product writes into its slice of one output (``out=``), so no
    concatenation, split or stacking pass is needed in either direction, and rows received from
    several peers run in the order they arrived (one segment per (peer, expert)).
    """

    @staticmethod
    def forward(ctx: Any, x_NI: Tensor, w_eIO: Tensor, segs: list[Segment]) -> Tensor:
        ctx.segs = segs
        ctx.save_for_backward(x_NI, w_eIO)
        return _segment_forward(x_NI, w_eIO, segs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_NO: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_NI, w_eIO = ctx.saved_tensors
        grad_x, grad_w = _segment_backward(g_NO, x_NI, w_eIO, ctx.segs, ctx.needs_input_grad[0],
                                           ctx.needs_input_grad[1])
        return grad_x, grad_w, None


def _segment_forward(x_NI: Tensor, w_eIO: Tensor, segs: list[Segment]) -> Tensor:
    """y[a:b] = x[a:b] @ w[j] for every segment (a, b, j), each product into its slice."""
    y_NO = x_NI.new_empty((x_NI.shape[0], w_eIO.shape[-1]))
    for a, b, j in segs:
        torch.mm(x_NI[a:b], w_eIO[j], out=y_NO[a:b])
    return y_NO


def _segment_backward(g_NO: Tensor, x_NI: Tensor, w_eIO: Tensor, segs: list[Segment], need_x: bool,
                      need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of :func:`_segment_forward` for x and w (an expert without rows: zero)."""
    g_NO = g_NO.contiguous()
    grad_x = grad_w = None
    if need_x:
        grad_x = x_NI.new_empty(x_NI.shape)
        for a, b, j in segs:
            torch.mm(g_NO[a:b], w_eIO[j].t(), out=grad_x[a:b])
    if need_w:
        grad_w = _segment_weight_grad(g_NO, x_NI, w_eIO, segs)
    return grad_x, grad_w


def _segment_weight_grad(g_NO: Tensor, x_NI: Tensor, w_eIO: Tensor, segs: list[Segment]) -> Tensor:
    """grad_w[j] = Σ over j's segments of x[a:b]ᵀ @ g[a:b]; an expert without rows gets zero.

    An expert with several segments (rows from several source ranks) sums them in fp32 when the
    weights are 16-bit, cast once at the end: adding in bf16 would round the running sum once per
    source rank.
    """
    repeated = len({j for _, _, j in segs}) < len(segs)
    low = w_eIO.dtype in (torch.bfloat16, torch.float16)
    grad_w = w_eIO.new_empty(w_eIO.shape, dtype=torch.float32 if repeated and low else w_eIO.dtype)
    seen: set[int] = set()
    for a, b, j in segs:
        if j in seen and low:
            grad_w[j].add_(x_NI[a:b].t() @ g_NO[a:b])  # the product rounded once, summed in fp32
        elif j in seen:
            grad_w[j].addmm_(x_NI[a:b].t(), g_NO[a:b])
        elif grad_w.dtype == x_NI.dtype:
            torch.mm(x_NI[a:b].t(), g_NO[a:b], out=grad_w[j])
        else:
            grad_w[j].copy_(x_NI[a:b].t() @ g_NO[a:b])
        seen.add(j)
    for j in set(range(w_eIO.shape[0])) - seen:
        grad_w[j].zero_()
    return grad_w.to(w_eIO.dtype)


def segment_mm(x_NI: Tensor, w_eIO: Tensor, segs: list[Segment]) -> Tensor:
    """Differentiable grouped GEMM over row segments (see :class:`_SegmentMM`)."""
    y: Tensor = _SegmentMM.apply(x_NI, w_eIO, segs)
    return y


# ---- the same GEMMs as one opaque operator, for torch.compile ----
# torch.compile cannot trace the host-side segment list (its length depends on the data) and its
# fake-tensor kernel of grouped_mm accepts bf16 only, so under compile the expert GEMMs are one custom
# operator each way: its fake implementation only states the output shape, its eager one reads the
# counts (a host read inside the operator) and runs the eager paths above.


def _op_segments(counts_G: Tensor, num_experts: int) -> list[Segment]:
    return segments(counts_G.reshape(-1, num_experts))  # NOTE: host-device sync (inside the operator)


def _one_group_per_expert(x_NI: Tensor, w_eIO: Tensor, counts_G: Tensor) -> bool:
    """Rows in expert-major groups (one source) that torch's CPU grouped_mm takes as they are."""
    return (counts_G.numel() == w_eIO.shape[0] and x_NI.device.type == "cpu" and _row_major(x_NI)
            and x_NI.dtype in (torch.float32, torch.bfloat16) and w_eIO.is_contiguous()
            and all(n * x_NI.element_size() % 16 == 0 for n in w_eIO.shape[1:])
            and grouped_mm_works(x_NI.device, x_NI.dtype))


@torch.library.custom_op("expert_parallel::segment_mm", mutates_args=())
def _segment_mm_op(x_NI: Tensor, w_eIO: Tensor, counts_G: Tensor) -> Tensor:
    """y[a:b] = x[a:b] @ w[g % e] over the row segments of sizes ``counts_G`` ([R·e]): the CPU
    grouped_mm (device offsets, no host read) where the rows allow, else the segment loop."""
    if _one_group_per_expert(x_NI, w_eIO, counts_G):
        return grouped_mm(x_NI, w_eIO, torch.cumsum(counts_G, 0).to(torch.int32))
    return _segment_forward(x_NI, w_eIO, _op_segments(counts_G, w_eIO.shape[0]))


@_segment_mm_op.register_fake
def _segment_mm_fake(x_NI: Tensor, w_eIO: Tensor, counts_G: Tensor) -> Tensor:
    return x_NI.new_empty((x_NI.shape[0], w_eIO.shape[-1]))


@torch.library.custom_op("expert_parallel::segment_mm_backward", mutates_args=())
def _segment_mm_backward_op(g_NO: Tensor, x_NI: Tensor, w_eIO: Tensor, counts_G: Tensor, need_x: bool,
                            need_w: bool) -> tuple[Tensor, Tensor]:
    """The gradients of x and w (an empty tensor for one not needed: frozen experts skip the
    weight-gradient GEMMs)."""
    if _one_group_per_expert(x_NI, w_eIO, counts_G):
        offs = torch.cumsum(counts_G, 0).to(torch.int32)
        g_NO = _as_row_major(g_NO)
        grad_x = grouped_mm(g_NO, w_eIO.transpose(-2, -1), offs) if need_x else None
        grad_w = grouped_mm(x_NI.t(), g_NO, offs) if need_w else None
    else:
        segs = _op_segments(counts_G, w_eIO.shape[0])
        grad_x, grad_w = _segment_backward(g_NO, x_NI, w_eIO, segs, need_x, need_w)
    return (x_NI.new_empty(0) if grad_x is None else grad_x,
            w_eIO.new_empty(0) if grad_w is None else grad_w)


@_segment_mm_backward_op.register_fake
def _segment_mm_backward_fake(g_NO: Tensor, x_NI: Tensor, w_eIO: Tensor, counts_G: Tensor, need_x: bool,
                              need_w: bool) -> tuple[Tensor, Tensor]:
    return (x_NI.new_empty(x_NI.shape if need_x else (0,)),
            w_eIO.new_empty(w_eIO.shape if need_w else (0,)))


def _segment_mm_setup(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _segment_mm_grad(ctx: Any, g_NO: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x_NI, w_eIO, counts_G = ctx.saved_tensors
    need_x, need_w = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    grad_x, grad_w = _segment_mm_backward_op(g_NO, x_NI, w_eIO, counts_G, need_x, need_w)
    return (grad_x if need_x else None), (grad_w if need_w else None), None


_segment_mm_op.register_autograd(_segment_mm_grad, setup_context=_segment_mm_setup)


class _RowMajorGrad(torch.autograd.Function):
    """Identity whose backward hands on a row-major gradient: torch's CUDA grouped_mm backward
    rejects the [0, 0] strides of an expanded gradient (a rank whose experts received no rows)."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return _as_row_major(g)


def _native_grouped_mm(x_NI: Tensor, w_eIO: Tensor, offs_e: Tensor) -> Tensor:
    """torch's grouped_mm with its own autograd (CUDA)."""
    y: Tensor = _RowMajorGrad.apply(grouped_mm(x_NI, w_eIO, offs_e))
    return y


class _CPUGroupedMM(torch.autograd.Function):
    """y = grouped_mm(x, w, offs) over expert-major rows, with the backward made of grouped_mm too.

    torch's CPU grouped_mm has a forward but no backward (torch 2.13). Its kernel loops over the
    groups in C++, which is 3–8 % faster per GEMM than the same loop of ``torch.mm`` calls from Python
    at ~500 rows per expert (measured in docs/architecture.md); the products are the same mm calls, so
    the results are identical to :func:`segment_mm`.
    """

    @staticmethod
    def forward(ctx: Any, x_NI: Tensor, w_eIO: Tensor, offs_e: Tensor) -> Tensor:
        ctx.save_for_backward(x_NI, w_eIO, offs_e)
        y_NO: Tensor = grouped_mm(x_NI, w_eIO, offs_e)
        return y_NO

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_NO: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_NI, w_eIO, offs_e = ctx.saved_tensors
        g_NO = _as_row_major(g_NO)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(g_NO, w_eIO.transpose(-2, -1), offs_e)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_mm(x_NI.t(), g_NO, offs_e)  # an empty group's product is zero
        return grad_x, grad_w, None


def segment_order(counts_Re: Tensor, total: int) -> Tensor:
    """Row positions that read rows ordered (source rank, expert) in (expert, source rank) order.

    ``total`` is counts_Re.sum(), which the caller already has on the host (no second sync here).
    """
    R, e = counts_Re.shape
    start_Re = torch.cumsum(counts_Re.reshape(-1), 0).reshape(R, e) - counts_Re
    sizes_eR, start_eR = counts_Re.t().reshape(-1), start_Re.t().reshape(-1)
    offset_eR = torch.cumsum(sizes_eR, 0) - sizes_eR
    shift = torch.repeat_interleave(start_eR - offset_eR, sizes_eR, output_size=total)
    return torch.arange(total, device=counts_Re.device) + shift


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
        self.clamp = (cfg.swiglu_alpha, cfg.swiglu_limit)
        self.d_model, self.d_ff = cfg.d_model, cfg.d_ff
        self.first = first
        self.num_local = cfg.num_experts if num_local is None else num_local
        self.gated, self.has_bias = cfg.gated, cfg.bias
        # Empty first (on the default device; on the meta device nothing is drawn), then filled.
        shapes = _init_ffn(cfg.d_model, cfg.d_ff, cfg.gated, cfg.bias, None, device="meta")
        for name, shape in shapes.items():
            weight = torch.empty((self.num_local, *shape.shape), dtype=cfg.dtype)
            self.register_parameter(name, nn.Parameter(weight))
        self.reset_parameters(base_seed)

    @torch.no_grad()
    def reset_parameters(self, base_seed: int) -> None:
        """Expert ``first + i`` from a CPU generator seeded with (base_seed, first + i) only: the same
        values in every layout and on every device. On the meta device there is nothing to fill."""
        params = dict(self.named_parameters())
        if not params or next(iter(params.values())).is_meta:
            return
        for i in range(self.num_local):
            weights = _init_ffn(self.d_model, self.d_ff, self.gated, self.has_bias,
                                _seeded_generator(base_seed, self.first + i), device="cpu")
            for name, value in weights.items():
                params[name][i].copy_(value)  # to the parameter's device and dtype

    def weights(self) -> dict[str, Tensor]:
        """The stacked expert tensors by state-dict name."""
        return dict(self.named_parameters())

    def forward(self, x_ND: Tensor, counts_Re: Tensor, counts_host: list[int] | None = None) -> Tensor:
        """Runs every local expert on its rows.

        Under autocast the rows and the weights are cast to autocast's dtype at the GEMMs (fp32
        master weights, bf16 compute; the weights' gradients come back in fp32), and the experts
        run with autocast off, so every path sees one dtype.

        Args:
            x_ND: rows ordered by (source rank, local expert): sorted by local expert in one
                process; with expert parallelism, one block per source rank, as received.
            counts_Re: int64 [R, e] (or [e] for one source), rows per (source rank, local expert);
                sums to N.
            counts_host: the same counts flattened on the host, if the caller has them (saves a
                device-to-host copy).

        Returns:
            y_ND: the expert outputs, row for row, in the compute dtype.
        """
        dtype = compute_dtype(x_ND)
        with autocast_off(x_ND.device):
            w = {name: p.to(dtype) for name, p in self.named_parameters()}  # no-op without autocast
            return self._run(x_ND.to(dtype), counts_Re.reshape(-1, self.num_local), w, counts_host)

    def _run(self, x_ND: Tensor, counts_Re: Tensor, w: dict[str, Tensor],
             counts_host: list[int] | None) -> Tensor:
        """The expert MLP on the fastest path this device and dtype have."""
        if _can_use_grouped_mm(x_ND, self.d_model, self.d_ff):  # device offsets: eager and compiled
            if counts_Re.shape[0] == 1:
                return self._grouped_mm(x_ND, counts_Re[0], w, _native_grouped_mm)
            order = segment_order(counts_Re, x_ND.shape[0])  # grouped_mm needs expert-major groups
            y_ND = self._grouped_mm(x_ND.index_select(0, order), counts_Re.sum(0), w, _native_grouped_mm)
            return y_ND.new_empty(y_ND.shape).index_copy(0, order, y_ND)
        if torch.compiler.is_compiling():
            counts_G = counts_Re.reshape(-1)
            return ffn(x_ND, w, self.activation, mm=lambda a, b: _segment_mm_op(a, b, counts_G),
                       add_bias=self._bias_adder(counts_Re, x_ND, w), clamp=self.clamp)
        if counts_Re.shape[0] == 1 and _can_use_cpu_grouped_mm(x_ND, self.d_model, self.d_ff):
            return self._grouped_mm(x_ND, counts_Re[0], w, _CPUGroupedMM.apply)
        segs = segments(counts_Re, counts_host)
        # The segment GEMMs see every row and weight even when a segment list is empty, so the
        # output always depends on them: a rank whose experts received nothing still runs the
        # backward all-to-alls that its peers wait in.
        return ffn(x_ND, w, self.activation, mm=lambda a, b: segment_mm(a, b, segs),
                   add_bias=self._bias_adder(counts_Re, x_ND, w), clamp=self.clamp)

    def takes_device_offsets(self, x_ND: Tensor) -> bool:
        """Whether one source's rows in x's dtype run on a grouped GEMM that takes the row offsets
        on the device (torch's fused CUDA kernel or its CPU kernel): no host read of the counts."""
        return (_can_use_grouped_mm(x_ND, self.d_model, self.d_ff)
                or _can_use_cpu_grouped_mm(x_ND, self.d_model, self.d_ff))

    def _bias_adder(self, counts_Re: Tensor, x_ND: Tensor, w: dict[str, Tensor]) -> MatMul:
        """``ffn``'s add_bias: h plus each row's expert bias (found once for all bias adds)."""
        if "b_in" not in w and "b_out" not in w:
            return _add  # ffn adds no bias then
        expert_N = self._expert_of_rows(counts_Re, x_ND)
        return lambda h, b: h + _bias_rows(b, expert_N)

    def _expert_of_rows(self, counts_Re: Tensor, x_ND: Tensor) -> Tensor:
        """The local expert of every row, and ``num_local`` (the zero row of :func:`_bias_rows`) for
        rows past the counted ones: a padded plan's dropped rows, whose values are undefined and
        whose gradients must not reach the biases."""
        ends_G = torch.cumsum(counts_Re.reshape(-1), 0)
        rows_N = torch.arange(x_ND.shape[0], device=x_ND.device)
        group_N = torch.searchsorted(ends_G, rows_N, right=True)  # G past the counted rows
        return torch.where(group_N < ends_G.shape[0], group_N % self.num_local, self.num_local)

    def _grouped_mm(self, x_ND: Tensor, counts_e: Tensor, w: dict[str, Tensor],
                    grouped_mm: Callable[..., Tensor]) -> Tensor:
        offs_e = torch.cumsum(counts_e, 0).to(torch.int32)
        return ffn(x_ND, w, self.activation, mm=lambda a, b: grouped_mm(a, b, offs_e),
                   add_bias=self._bias_adder(counts_e[None], x_ND, w), clamp=self.clamp)


def _bias_rows(b_eF: Tensor, expert_N: Tensor) -> Tensor:
    """Each row's expert bias, a zero row for index e (rows past the counted ones): the gradient
    those rows send to it is discarded with the extra row."""
    return torch.cat([b_eF, b_eF.new_zeros((1, b_eF.shape[-1]))])[expert_N]


class FeedForward(nn.Module):
    """Dense feed-forward baseline with the layout of one expert.

    Parameters: ``w_in`` [D, F], ``w_gate`` [D, F] (gated activations), ``w_out`` [F, D], and with
    ``bias`` ``b_in`` [F], ``b_gate`` [F], ``b_out`` [D]: a dense checkpoint upcycles into experts by
    copying these tensors into every expert row. ``swiglu_alpha`` / ``swiglu_limit``: clamped_swiglu's.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0,
                 bias: bool = False, dtype: torch.dtype = torch.float32, swiglu_alpha: float = SWIGLU_ALPHA,
                 swiglu_limit: float = SWIGLU_LIMIT) -> None:
        super().__init__()
        # The config validates the arguments shared with MoE (sizes, activation, dropout, dtype).
        cfg = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=1, top_k=1, activation=activation,
                        dropout=dropout, bias=bias, dtype=dtype, swiglu_alpha=swiglu_alpha,
                        swiglu_limit=swiglu_limit)
        self.activation, self.d_model = cfg.activation, d_model
        self.clamp = (cfg.swiglu_alpha, cfg.swiglu_limit)
        self.dropout = nn.Dropout(cfg.dropout)
        self.d_ff, self.gated, self.has_bias = d_ff, cfg.gated, bias
        for name, value in _init_ffn(d_model, d_ff, cfg.gated, bias, None).items():
            self.register_parameter(name, nn.Parameter(value.to(cfg.dtype)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draws the weights again as the constructor did (torch's generator of their device)."""
        device = next(self.parameters()).device
        weights = _init_ffn(self.d_model, self.d_ff, self.gated, self.has_bias, None, device)
        for name, value in weights.items():
            getattr(self, name).copy_(value)

    def forward(self, x_BLD: Tensor) -> Tensor:
        """Args: x_BLD [..., D]. Returns: y [..., D], same shape and dtype."""
        if x_BLD.shape[-1] != self.d_model:
            raise ValueError(f"FeedForward expected last dimension d_model={self.d_model}, "
                             f"got input of shape {tuple(x_BLD.shape)}")
        weights: dict[str, Tensor] = dict(self.named_parameters())
        return self.dropout(ffn(x_BLD, weights, self.activation, clamp=self.clamp))


__all__ = ["ACTIVATIONS", "FeedForward", "GroupedExperts", "RngSnapshot", "activate", "draw_base_seed",
           "ffn", "glu", "segment_mm", "segment_order", "segments"]
