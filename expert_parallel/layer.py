"""MoE: router -> plan -> dispatch -> experts -> combine, on x_BLD."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.profiler import record_function

from .comm.ddp_sync import ExpertReplicas, LayerSync, ddp_world_size
from .comm.distributed import (
    all_gather_cat,
    check_node_layout,
    check_same_on_all_ranks,
    fingerprint,
    full_tensor,
    gather_rows_to,
    group_ranks_per_node,
    group_size_and_rank,
    in_group,
    launch_env,
    receives,
    unsharded,
)
from .comm.exchange import AllToAllDispatcher, HierarchicalDispatcher, register_layer
from .config import MoEConfig
from .ops.dispatch import CallInfo, Dispatcher, LocalDispatcher
from .ops.experts import FeedForward, GroupedExperts, RngSnapshot, draw_base_seed
from .ops.losses import (
    MoEAux,
    empty_aux,
    load_balance_loss,
    make_aux,
    max_violation,
    router_entropy,
    seq_balance_loss,
    z_loss,
)
from .ops.plan import RoutingPlan, expert_choice_plan, soft_plan, token_choice_plan
from .ops.precision import autocast_on, compute_dtype
from .ops.private import (
    active_ddp_module,
    current_graph_task_id,
    ddp_managed_parameters,
    non_persistent_buffer_names,
)
from .ops.routing import (
    ExpertChoiceRouter,
    TopKRouter,
    capacity,
    expert_choice_from_logits,
    group_size,
    make_router,
    soft_from_logits,
)

SEED_HINT = (": every rank must build the model after the same torch.manual_seed(seed), so that the "
             "router and the experts start equal to the single-device model; seed per-rank randomness "
             "(data order, dropout) after building it, or give it a torch.Generator of its own")


PLAIN_DDP = ("is inside a torch.nn.parallel.DistributedDataParallel that manages its experts, which is "
             "wrong for expert-parallel layers: its constructor broadcast rank 0's parameters, so every "
             "rank's experts are now rank 0's, and it would average the gradients of different experts "
             "over the job. Call ep.prepare_ddp(model, ctx) on the model before wrapping it (any DDP "
             "wrapper, e.g. Hugging Face Trainer's or accelerate's, then leaves the experts to us; "
             "ep.hf.expert_parallelize does it for you), or wrap it with ep.data_parallel(model, ctx); "
             "rebuild or reload the model first: its experts were overwritten")
UNREDUCED_DDP = ("is inside a DistributedDataParallel that ignores its experts, but nothing reduces their "
                 "gradients: call ep.prepare_ddp(model, ctx) on the model before wrapping it")


def in_backward() -> bool:
    """True while autograd runs a backward pass: a checkpointed forward being recomputed
    (torch.utils.checkpoint, reentrant or not), whose side effects happened already."""
    return not torch.compiler.is_compiling() and current_graph_task_id() != -1


def make_dispatcher(cfg: MoEConfig, ep_group: ProcessGroup, ranks_per_node: int | None) -> Dispatcher:
    """The expert-parallel dispatcher that ``cfg.exchange`` names (a collective for the first layer)."""
    P = group_ranks_per_node(ep_group, ranks_per_node)
    if cfg.exchange == "flat":
        return AllToAllDispatcher(ep_group, cfg.num_experts, P or 0)
    if P is None:
        per_node = ranks_per_node or "LOCAL_WORLD_SIZE"
        raise ValueError(f"MoEConfig.exchange='hierarchical' needs an expert-parallel group with the same "
                         f"number of contiguous ranks on every node; ranks "
                         f"{dist.get_process_group_ranks(ep_group)} with {per_node} ranks per node are not")
    check_node_layout(ep_group, P, from_launcher=ranks_per_node is None)
    return HierarchicalDispatcher(ep_group, cfg.num_experts, P)


_NO_GROUP = object()  # ep_group not given: one device


def _checked_group(ep_group: ProcessGroup | object | None) -> ProcessGroup | None:
    """The expert-parallel group ``MoE(ep_group=...)`` got. ValueError for an explicit None in a
    launched job of several processes before torch.distributed is initialised: that is
    ``dist.group.WORLD`` read before ``init_distributed``, which would silently build a layer holding
    every expert on each rank (in a plain ``python`` process, None is the one-device layer)."""
    if ep_group is _NO_GROUP:
        return None
    if ep_group is None and not dist.is_initialized() and launch_env().world_size > 1:
        raise ValueError("MoE(ep_group=None) in a job of several processes before torch.distributed is "
                         "initialised (dist.group.WORLD is None until init_process_group runs): call "
                         "ctx = ep.init_distributed(...) first and pass ep_group=ctx.ep_group; for a "
                         "one-device layer pass no ep_group at all")
    if ep_group is not None and not isinstance(ep_group, ProcessGroup):
        raise ValueError(f"MoE ep_group must be a torch.distributed ProcessGroup (ctx.ep_group), got "
                         f"{type(ep_group).__name__}")
    return ep_group


class MoE(nn.Module):
    """A sparse Mixture-of-Experts feed-forward layer.

    State-dict keys: ``router.weight`` [E, D] ([E·slots_per_expert, D] for soft),
    ``router.noise.weight`` [E, D] (noisy_topk),
    ``experts.w_in`` [E, D, F], ``experts.w_gate`` [E, D, F] (swiglu / geglu),
    ``experts.w_out`` [E, F, D], and with ``bias`` ``experts.b_in`` / ``b_gate`` [E, F],
    ``experts.b_out`` [E, D].

    Under expert parallelism (``ep_group`` of R > 1 ranks) this rank holds experts
    [r·E/R, (r+1)·E/R): its ``state_dict`` has those rows only, ``full_state_dict`` gathers the
    single-device layout and ``load_full_state_dict`` takes this rank's slice of one.

    Args:
        cfg: the validated layer configuration.
        ep_group: the expert-parallel process group (``ctx.ep_group``); None for one device.
        ranks_per_node: ranks per node of the job (nodes hold contiguous ranks), for
            ``cfg.exchange="hierarchical"`` and the traffic report's intra/inter-node split; None
            takes the launcher's LOCAL_WORLD_SIZE (or its equivalent; one node without a launcher).

    Raises:
        ValueError: num_experts is not divisible by the expert-parallel size; the hierarchical
            exchange on an expert-parallel group that spans nodes unevenly; or the ranks of
            ``ep_group`` differ in the config, the router's initial weights or the experts' base
            seed (each rank built the model after a different seed): one ``all_gather_object``
            at construction checks all three.
    """

    # Marks the layers whose ``experts`` hold this rank's share of the experts (ep.sync_gradients,
    # the wrappers and checkpoints find expert parameters by it, whatever module ``experts`` is).
    expert_parallel_layer = True

    def __init__(self, cfg: MoEConfig, ep_group: ProcessGroup | object | None = _NO_GROUP,
                 ranks_per_node: int | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(cfg, _checked_group(ep_group), ranks_per_node)

    def _build(self, cfg: MoEConfig, ep_group: ProcessGroup | None, ranks_per_node: int | None) -> None:
        """The constructor's work on the default device (``device=``'s, when given)."""
        self.cfg = cfg
        self.ep_group = ep_group
        self.ep_size, self.ep_rank = group_size_and_rank(ep_group)
        if cfg.num_experts % self.ep_size:
            raise ValueError(f"MoEConfig.num_experts={cfg.num_experts} is not divisible by the "
                             f"expert-parallel size {self.ep_size}")
        self.layer_name = "MoE"  # its qualified name once ep.configure_debug(model) ran
        self.calls = 0  # per-layer call number, named in every collective's error
        # Set by ep.prepare_ddp: where the experts' gradients are reduced under a DDP wrapper.
        self.ddp_replicas: ExpertReplicas | None = None
        self._ddp_sync_state = LayerSync()
        self._ddp_sync_last = False
        self.check_finite = False  # opt-in: raise on NaN/Inf input or router logits
        self.check_splits = False  # opt-in: cross-check exchange split sizes between ranks
        local = cfg.num_experts // self.ep_size
        # The generators' states before anything is drawn: reset_parameters() draws it all again.
        self.init_rng = RngSnapshot.take()
        # One draw from the global CPU generator; expert i is initialised from (base_seed, i). Drawn
        # before the router, whose draws come from the default device's generator: the experts are
        # then the same whether the layer is built on the CPU or under torch.device("cuda").
        base_seed = draw_base_seed()
        self.router = make_router(cfg)
        self.experts = GroupedExperts(cfg, base_seed, num_local=local, first=self.ep_rank * local)
        # Always-on shared experts (replicated like the router): keys shared_experts.w_in/w_gate/w_out.
        self.shared_experts = (FeedForward(cfg.d_model, cfg.shared_width, cfg.activation, bias=cfg.bias,
                                           dtype=cfg.dtype, swiglu_alpha=cfg.swiglu_alpha,
                                           swiglu_limit=cfg.swiglu_limit)
                               if cfg.num_shared_experts else None)
        self.shared_gate = (nn.Linear(cfg.d_model, 1, bias=False, dtype=cfg.dtype)
                            if cfg.shared_expert_gate else None)
        self.base_seed = base_seed
        self.replicas_checked = False  # checked where values exist: now, reset_parameters or forward
        if not self.router.weight.is_meta:
            self.check_replicas()
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.layer_id = 0  # its number among the expert-parallel layers on its ranks
        self.joined = False  # inside ep.join: training forwards are refused
        if ep_group is not None and self.ep_size > 1:
            self.dispatcher = make_dispatcher(cfg, ep_group, ranks_per_node)
            self.layer_id = register_layer(ep_group, self)
        self.dropout = nn.Dropout(cfg.dropout)

    def __deepcopy__(self, memo: dict[int, object]) -> MoE:
        """``copy.deepcopy``: parameters, buffers and config of its own; the process groups shared.

        Process groups cannot be copied, and the copy exchanges tokens with the same peers: it keeps
        every attribute that is or holds a group (``ep_group``, the dispatcher, ``ddp_replicas``,
        DeepSpeed's ``ep_context``). The bookkeeping of a running backward under DDP starts empty.
        """
        import copy

        for value in self.__dict__.values():
            held = getattr(value, "__dict__", {}).values()
            if isinstance(value, ProcessGroup) or any(isinstance(v, ProcessGroup) for v in held):
                memo[id(value)] = value
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__dict__, memo))
        clone._ddp_sync_state = LayerSync()
        if clone.ep_group is not None and clone.ep_size > 1:
            # a number of its own (every rank copies its model alike): the count exchange and
            # ep.join must tell the copy, whose weights may move apart, from the original
            clone.layer_id = register_layer(clone.ep_group, clone)
        return clone

    def check_replicas(self) -> None:
        """Raises ValueError unless every rank of the expert-parallel group has the same config,
        the same non-expert state (router, expert bias, shared experts: fingerprints) and the same
        expert base seed; one ``all_gather_object``. Run at construction; call it again after
        replacing replicated weights (as ``ep.hf.expert_parallelize`` does)."""
        if self.ep_group is None:
            self.replicas_checked = True
            return
        replicas = {n: fingerprint(full_tensor(t))  # NOTE: collective for a DTensor (fully_shard)
                    for n, t in self._replicated_state().items()}
        check_same_on_all_ranks({"MoEConfig": asdict(self.cfg),
                                 "MoE replicated state": {**replicas, "expert base seed": self.base_seed}},
                                self.ep_group, hints={"MoE replicated state": SEED_HINT})
        self.replicas_checked = True

    def _replicated_state(self) -> dict[str, Tensor]:
        """The parameters and persistent buffers outside the experts, by state-dict name; read off
        the modules, not through ``state_dict()``, whose FSDP2 hooks would reshard a block in the
        middle of its forward."""
        state: dict[str, Tensor] = {}
        for name, module in self.named_modules():
            if name == "experts" or name.startswith("experts."):  # whatever module holds them
                continue
            prefix = f"{name}." if name else ""
            own = {"recurse": False, "remove_duplicate": False}
            state.update({prefix + n: p for n, p in module.named_parameters(**own)})
            left_out = non_persistent_buffer_names(module)
            state.update({prefix + n: b for n, b in module.named_buffers(**own) if n not in left_out})
        return state

    def reset_parameters(self) -> None:
        """Initialises every parameter and buffer in place (e.g. after ``to_empty`` of a model built
        on the meta device) to exactly what a direct build after the same ``torch.manual_seed``
        gives on this device, at any expert-parallel size: the generators' states of the
        construction are restored for the duration, and the expert base seed, the router, the
        experts and the shared experts are drawn again in the constructor's order. The expert bias
        and the counts restart from zero. Then the replicas are checked (a collective over the
        expert-parallel group)."""
        device = self.router.weight.device
        if device.type == "meta":
            raise ValueError("MoE.reset_parameters: the parameters are on the meta device; move the "
                             "model first (model.to_empty(device=...))")
        with self.init_rng.restored(device), unsharded(self):
            self.base_seed = draw_base_seed()
            self.router.reset_parameters()
            self.experts.reset_parameters(self.base_seed)
            if self.shared_experts is not None:
                self.shared_experts.reset_parameters()
            if self.shared_gate is not None:
                self.shared_gate.reset_parameters()
        self.check_replicas()

    def forward(self, x_BLD: Tensor, router_logits: Tensor | None = None) -> tuple[Tensor, MoEAux]:
        """Routes every token to its experts and mixes their outputs.

        ``router_logits`` ([B·L, E] or [B, L, E]): logits computed outside (e.g. by a Hugging Face
        router module, whose output recording must see the call) used instead of
        ``router.logits(x)``; routing from them follows this layer's config (cast to router_dtype).

        Under autocast (fp32 parameters, bf16 compute) the router and the gates stay in
        router_dtype, the token rows are cast to bf16 before the exchange (half the bytes), the
        expert GEMMs run in bf16, and the weighted combine sums in fp32.

        Args:
            x_BLD: [B, L, D] input, dtype equal to cfg.dtype (or, under autocast, autocast's dtype).

        Returns:
            y_BLD: [B, L, D], same shape and dtype as the input.
            aux: the auxiliary losses and routing statistics (:class:`MoEAux`).
        """
        self._check_input(x_BLD)
        ddp_sync = self._ddp_sync()
        if not self.replicas_checked:  # built on the meta device and loaded since
            self.check_replicas()
        B, L, D = x_BLD.shape
        # A recomputation (activation checkpointing) is the same call again. Under torch.compile
        # the count stays put: a module attribute that changes every call would make Dynamo
        # recompile every call (and then fall back to eager once its cache is full).
        if not in_backward() and not torch.compiler.is_compiling():
            self.calls += 1
        compiling = torch.compiler.is_compiling()  # errors then name the call 0: no guard on calls
        info = CallInfo(self.layer_name, 0 if compiling else self.calls, self.check_splits, self.layer_id,
                        joined=self.joined)
        if self.joined:
            self._check_forward_only(x_BLD)
        # No early return for a batch without tokens: every parameter (router, experts, shared
        # experts) takes part in the graph with a zero gradient, as DistributedDataParallel's buckets
        # and FSDP2's collectives need, and with peers the rank still joins the exchange. Its one
        # empty group has S = 1, whatever examples_per_group would ask of L = 0.
        S = group_size(self.cfg, B, L) if B * L else 1
        x_TD = x_BLD.reshape(B * L, D)
        # The record_function scopes name the phases in profiles (`expert-parallel bench --profile`).
        with record_function("moe/router"):
            if router_logits is None:
                logits_GSE = self.router.logits(x_TD.reshape(-1, S, D))
            else:
                self._check_router_logits(router_logits, B * L)
                logits_GSE = router_logits.to(self.cfg.router_dtype).reshape(-1, S, router_logits.shape[-1])
        if self.check_finite:
            info = self._check_finite(x_TD, logits_GSE, info)
        rows_TD = x_TD.to(compute_dtype(x_TD))  # a no-op without autocast
        with record_function("moe/plan"):
            # One process pads a capacity plan where the expert GEMMs take device offsets: no
            # host read sizes the kept rows (docs/architecture.md, "Host syncs"). Not under anomaly
            # detection (eager), which would flag the undefined values of the dropped rows' backward.
            eager_anomaly = not torch.compiler.is_compiling() and torch.is_anomaly_enabled()
            pad = self.ep_size > 1 or (self.experts.takes_device_offsets(rows_TD) and not eager_anomaly)
            plan, aux = self._route(logits_GSE, B, pad_drops=pad)
        with record_function("moe/dispatch"):
            dispatched = self.dispatcher.dispatch(rows_TD, plan, info)
        with record_function("moe/experts"):
            y_nD = self.experts(dispatched.x_nD, dispatched.counts_Re, dispatched.counts_host)
        with record_function("moe/combine"):
            y_TD = self.dispatcher.combine(y_nD, dispatched, B * L).to(x_BLD.dtype)
        shared_TD = self._shared(x_TD)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        aux = replace(aux, expert_counts=dispatched.counts_E_global, comm=dispatched.comm,
                      max_violation=max_violation(dispatched.selected_E_global))
        return self._reduced_under_ddp(self.dropout(y_TD.reshape(B, L, D)), ddp_sync), aux

    def _route(self, logits_GSE: Tensor, batch: int | None = None,
               pad_drops: bool | None = None) -> tuple[RoutingPlan, MoEAux]:
        """The routing plan and the aux losses from the router logits ([G, S, E·P] for soft).

        ``batch``: B, the sequences of the G·S tokens, for the sequence-wise balance loss (None: one
        sequence). ``pad_drops``: a capacity plan keeps its dropped assignments after the kept ones
        (:attr:`RoutingPlan.padded`); default: under expert parallelism.
        """
        cfg = self.cfg
        S = logits_GSE.shape[1]
        balance = seq = logits_GSE.new_zeros(())  # expert choice and soft need no balance loss
        if isinstance(self.router, TopKRouter):
            routed = self.router.route(logits_GSE)
            # With peers the kept rows are sized at the exchange's one host read (a padded plan).
            plan = token_choice_plan(routed.indices, routed.gates, routed.probs,
                                     capacity(cfg, S, self.training), cfg.drop_policy,
                                     pad_drops=self.ep_size > 1 if pad_drops is None else pad_drops)
            balance = load_balance_loss(routed.indices, routed.probs)
            if logits_GSE.numel():
                B = batch or 1
                seq = seq_balance_loss(routed.indices.reshape(B, -1, cfg.top_k),
                                       routed.probs.reshape(B, -1, cfg.num_experts))
            self._count_selections(plan)
        elif isinstance(self.router, ExpertChoiceRouter):
            choose = expert_choice_from_logits
            if self.ep_size > 1 and torch.compiler.is_compiling():
                # eager: inductor's gradient of this selection came out wrong when the graph ends at
                # the exchange's split-size read (torch 2.13; aot_eager is right, one process too)
                choose = torch.compiler.disable(expert_choice_from_logits)
            chosen = choose(logits_GSE, self.router.capacity(S))
            plan = expert_choice_plan(chosen.token_indices, chosen.weights, S)
        else:
            soft = soft_from_logits(logits_GSE)
            plan = soft_plan(soft.dispatch, soft.combine, cfg.num_experts)
        if logits_GSE.numel() == 0:  # an empty rank under expert parallelism
            return plan, empty_aux(cfg.num_experts, logits_GSE.device)
        aux = make_aux(balance=balance, zloss=z_loss(logits_GSE), entropy=router_entropy(logits_GSE),
                       dropped=plan.dropped_fraction, counts_E=plan.counts_E, seq=seq,
                       balance_coef=cfg.load_balance_coef, z_coef=cfg.z_loss_coef,
                       seq_coef=cfg.seq_aux_loss_coef)
        return plan, aux

    def _count_selections(self, plan: RoutingPlan) -> None:
        """Aux-loss-free balancing: training-mode forwards add their selected assignments to the
        router's load, which ep.update_expert_bias consumes. A recomputation under activation
        checkpointing (inside the backward) does not count again; the first forward counts, also
        when it runs without grad (a reentrant checkpoint's)."""
        load = getattr(self.router, "expert_load", None)
        if load is not None and self.training and not in_backward():
            load += plan.selected_E

    def _ddp_sync(self) -> bool:
        """See :meth:`_ddp_sync_eager`; under torch.compile it runs eagerly (a graph break) for a
        layer that exchanges tokens or was prepared for DDP, and is skipped for the others."""
        if torch.compiler.is_compiling() and self.ep_size == 1 and self.ddp_replicas is None:
            return False
        return self._ddp_sync_eager()

    @torch.compiler.disable
    def _ddp_sync_eager(self) -> bool:
        """Whether this forward's backward must reduce the experts' gradients itself: it runs inside
        a DistributedDataParallel that ignores them (``ep.prepare_ddp``) with gradient
        synchronisation on. A recomputation inside the backward (activation checkpointing) repeats
        the decision of the forward it repeats. RuntimeError inside a DDP that manages the experts
        of an expert-parallel layer (its constructor overwrote them)."""
        if in_backward():
            return self._ddp_sync_last
        self._ddp_sync_state.reset()
        self._ddp_sync_last = False
        ddp = active_ddp_module()
        if ddp is None:
            return False
        managed = {id(p) for p in ddp_managed_parameters(ddp)}
        if any(id(p) in managed for p in self.experts.parameters()):
            if self.ep_size == 1:  # replicated experts: DDP's usual work is right for them
                return False
            raise RuntimeError(f"{self.layer_name} {PLAIN_DDP}")
        if self.ddp_replicas is None:
            raise RuntimeError(f"{self.layer_name} {UNREDUCED_DDP}")
        if ddp_world_size(ddp) != self.ddp_replicas.world_size:
            raise ValueError(f"{self.layer_name}: the DistributedDataParallel averages over "
                             f"{ddp_world_size(ddp)} ranks, but ep.prepare_ddp was given a job of "
                             f"{self.ddp_replicas.world_size}; wrap the model over the job's whole group")
        self._ddp_sync_last = bool(ddp.require_backward_grad_sync)
        return self._ddp_sync_last

    def _reduced_under_ddp(self, y_BLD: Tensor, ddp_sync: bool) -> Tensor:
        """``y_BLD``, with the experts' reduction queued for the end of its backward when
        ``ddp_sync``."""
        if ddp_sync:
            self._queue_reduction(y_BLD)
        return y_BLD

    @torch.compiler.disable
    def _queue_reduction(self, y_BLD: Tensor) -> None:
        """Queues the experts' reduction once per backward, for the end of its outermost pass, however
        many times (and under whatever activation checkpointing) the layer runs (comm/ddp_sync.py)."""
        assert self.ddp_replicas is not None
        params = [p for p in self.experts.parameters() if p.requires_grad]
        self._ddp_sync_state.reduce_at_end_of_backward(params, self.ddp_replicas, y_BLD)

    def _shared(self, x_TD: Tensor) -> Tensor | None:
        """The always-on shared experts' output (times the sigmoid gate, with one); None without."""
        if self.shared_experts is None:
            return None
        y_TD = self.shared_experts(x_TD)
        if self.shared_gate is not None:
            y_TD = y_TD * torch.sigmoid(self.shared_gate(x_TD))
        return y_TD

    def _check_finite(self, x_TD: Tensor, logits_GSE: Tensor, info: CallInfo) -> CallInfo:
        """Raises FloatingPointError on NaN/Inf. With peers, the flags travel in the count exchange
        (``info.flags``), where every rank of the group raises alike, so no rank hangs."""
        flags = (~torch.isfinite(x_TD).all()).long() + 2 * (~torch.isfinite(logits_GSE).all()).long()
        if self.ep_size > 1:
            return replace(info, flags=flags)
        bad = int(flags)  # NOTE: host-device sync (opt-in debug check)
        if bad:
            where = "the input" if bad & 1 else "the router logits"
            raise FloatingPointError(f"{info.layer} call {info.call}: NaN or Inf in {where}")
        return info

    def _check_forward_only(self, x_BLD: Tensor) -> None:
        """Inside ep.join: a training forward (train mode with grad enabled) is refused at once,
        on every rank alike (a finished rank could not serve its backward)."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(f"{self.layer_name}: a training forward (train mode, grad enabled) inside "
                               f"ep.join, which serves forward-only loops (evaluation, generation, "
                               f"torch.no_grad); train with the same number of batches on every rank, "
                               f"or call model.eval() / torch.no_grad() for a forward-only loop")

    # ---- checkpoints in the single-device layout ----
    def full_state_dict(self, to_rank: int | None = None) -> dict[str, Tensor]:
        """The single-device state dict (all E experts), gathered over the expert-parallel group.

        Every rank of the job must call it (it is a collective). ``to_rank=None``: every rank gets
        the result (all-gathers); else only global rank ``to_rank`` does: the experts are sent to it
        one tensor at a time, the other ranks get ``{}`` and hold nothing more than their own.
        """
        self._check_expert_layout("full_state_dict")
        keeps = receives(to_rank)
        full: dict[str, Tensor] = {}
        for name, value in self.state_dict().items():
            value = full_tensor(value)  # NOTE: collective for a DTensor (ep.fully_shard's shards)
            if not name.startswith("experts."):
                if keeps:
                    full[name] = value.clone()
            elif to_rank is None:  # NOTE: collective
                full[name] = value.clone() if self.ep_group is None else all_gather_cat(value, self.ep_group)
            elif in_group(self.ep_group, to_rank):  # ranks of the other replicas have nothing to send
                whole = gather_rows_to(value, self.ep_group, to_rank)  # NOTE: collective
                if whole is not None and keeps:
                    full[name] = whole.clone() if whole.data_ptr() == value.data_ptr() else whole
        return full

    def load_full_state_dict(self, full_sd: dict[str, Tensor]) -> None:
        """Loads this rank's slice of a single-device state dict (same keys as ``MoE(cfg)``).

        Raises:
            ValueError: a key is missing or unexpected, or a tensor has the wrong shape.
        """
        self._check_expert_layout("load_full_state_dict")
        own = self.state_dict()
        missing, extra = sorted(set(own) - set(full_sd)), sorted(set(full_sd) - set(own))
        if missing or extra:
            raise ValueError(f"MoE state dict mismatch: missing keys {missing}, unexpected keys {extra}")
        first, count = self.experts.first, self.experts.num_local
        local: dict[str, Tensor] = {}
        for name, mine in own.items():
            value = full_sd[name]
            expected = (self.cfg.num_experts, *mine.shape[1:]) if name.startswith("experts.") else mine.shape
            if tuple(value.shape) != tuple(expected):
                raise ValueError(f"MoE state dict key {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(expected)}")
            local[name] = value[first:first + count] if name.startswith("experts.") else value
        self.load_state_dict(local)

    def _check_expert_layout(self, what: str) -> None:
        """ValueError where ``experts`` is no longer a GroupedExperts (replaced by the user) in a
        layer with peers: the single-device layout stacks GroupedExperts' [e, ...] rows over the
        ranks, which says nothing of another module's tensors."""
        if self.ep_size > 1 and not isinstance(self.experts, GroupedExperts):
            raise ValueError(f"{self.layer_name}.{what}: experts is a {type(self.experts).__name__}, not the "
                             f"layer's GroupedExperts, so the single-device layout of its tensors is "
                             f"unknown; gather your module's state yourself, or keep moe.experts a "
                             f"GroupedExperts")

    def _check_router_logits(self, logits: Tensor, tokens: int) -> None:
        outputs = self.router.weight.shape[0]
        if logits.shape[-1] != outputs or logits.numel() != tokens * outputs:
            raise ValueError(f"MoE router_logits of shape {tuple(logits.shape)} do not fit {tokens} tokens "
                             f"and {outputs} router outputs")
        if logits.device != self.router.weight.device:
            raise ValueError(f"MoE router_logits are on {logits.device}, the layer on "
                             f"{self.router.weight.device}")

    def _check_input(self, x_BLD: Tensor) -> None:
        cfg = self.cfg
        if x_BLD.dim() != 3 or x_BLD.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE expected input [B, L, D] with D=d_model={cfg.d_model}, "
                             f"got shape {tuple(x_BLD.shape)}")
        # The parameters as this forward sees them: the config's dtype, or FSDP2's param_dtype, which
        # has cast the router by now (the experts, a unit of their own, are cast when they run); a
        # router kept in fp32 in a bf16 model (transformers' DeepSeek-V3) does not decide.
        weight = self.router.weight
        allowed = {self.cfg.dtype, weight.dtype}
        if x_BLD.dtype not in allowed and not (autocast_on(x_BLD.device)
                                               and x_BLD.dtype == compute_dtype(x_BLD)):
            raise ValueError(f"MoE input dtype {x_BLD.dtype} does not match the parameter dtype "
                             f"{self.cfg.dtype} (MoEConfig.dtype, or FSDP2's param_dtype {weight.dtype}) "
                             f"or autocast's dtype")
        if x_BLD.device != weight.device:
            raise ValueError(f"MoE input is on {x_BLD.device} but the parameters are on "
                             f"{weight.device}")


def configure_debug(model: nn.Module, *, check_finite: bool | None = None,
                    check_splits: bool | None = None) -> list[str]:
    """Names every MoE of ``model`` by its qualified name (used in every error) and sets debug checks.

    Args:
        check_finite: raise FloatingPointError naming the layer on NaN/Inf input or router logits.
        check_splits: cross-check the exchange split sizes between ranks on every call (one extra
            all-gather per exchange; gloo would otherwise read garbage on a mismatch).

    Returns:
        the names of the MoE layers.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.layer_name = name or "MoE"
            if check_finite is not None:
                module.check_finite = check_finite
            if check_splits is not None:
                module.check_splits = check_splits
            names.append(module.layer_name)
    return names
