"""R_sp inside Megatron, exact under expert, tensor and expert-tensor parallelism.

A token's k routed experts may live on different EP ranks, and with expert-tensor parallelism
each rank holds only an F/etp slice of an expert's activation. Every co-activated pair counts, so
the activations of each token are brought back to the rank that owns the token:

1. capture: a forward hook on the experts' ``linear_fc1`` (each local expert of ``SequentialMLP``,
   or ``TEGroupedMLP``'s grouped linear) recomputes z = act(gate) ⊙ (up + offset) from fc1's
   output exactly as Megatron's MLP does, row by row in the dispatched order (the plugin's
   grouped-GEMM experts hand over the z their kernels keep for backward: no recomputation); with
   ``--moe-specialization-include-shared-experts`` the shared expert's rows are captured too;
2. where each row came from: a small tensor per token (owner rank in the dispatch group, token
   index, its routed experts) is dispatched through a shallow copy of the layer's own token
   dispatcher, so the expert side learns the owner, token and slot of every row whatever the
   dispatcher's internal order (allgather or alltoall, any TP/EP layout);
3. return: the rows (each rank its F-slice) go back to their owners in one differentiable
   all-to-all over the dispatch (TP x EP) group; the owner assembles z_TKF for its tokens
   (the F-slices side by side) and computes R_sp over them (``losses.specialization``);
4. attach: the owner attaches coeff x R_sp to its experts' output with Megatron's aux-loss scale
   semantics (``aux_loss.attach_local_mean_loss``); gradients flow back through the same
   all-to-all into the experts' fc1 weights and inputs.

Extra communication per MoE layer and micro-batch, forward and backward: one all-to-all of the
SwiGLU rows (k x F values per token, in the activation dtype) plus, forward only, one dispatch of
(k + 2) floats per token. Computed only in calls with gradients enabled, so activation recompute
(selective ``moe``/``moe_act`` or full) counts each micro-batch once. Memory: for backward the
loss keeps only the assembled z of each layer (T x slots x F values); the SwiGLU recomputation and
the normalized Gram are recomputed in backward.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import all_to_all
from torch.utils.checkpoint import checkpoint

from megatron_moe_reg.integration.megatron.aux_loss import attach_to_experts_output
from megatron_moe_reg.integration.regularizers.base import InstallContext, RegularizerBase, StepPlan
from megatron_moe_reg.losses.specialization import specialization_loss

if TYPE_CHECKING:
    from megatron_moe_reg.routers.base import RoutingRecord

META_ROUTED = 2  # columns: owner rank, token index, then the routed experts (-1 padded)


def glu_intermediate(fc1_output: torch.Tensor, bias: torch.Tensor | None, config) -> torch.Tensor:
    """The input of fc2 before router-probability scaling, as Megatron's MLP computes it."""
    x = fc1_output if bias is None else fc1_output + bias
    if not config.gated_linear_unit:
        return config.activation_func(x)
    gate, linear = torch.chunk(x, 2, dim=-1)
    clamp = getattr(config, "activation_func_clamp_value", None)
    if clamp is not None:
        gate = gate.clamp(max=clamp)
        linear = linear.clamp(min=-clamp, max=clamp)
    return config.activation_func(gate) * (linear + getattr(config, "glu_linear_offset", 0.0))


def _recomputed(fn, *args):
    """``fn(*args)`` keeping only its inputs for backward (intermediates are recomputed)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def _fc1_modules(experts) -> list:
    """The fc1 module(s) of an experts module, in the order its rows are processed."""
    if hasattr(experts, "local_experts"):  # SequentialMLP
        return [expert.linear_fc1 for expert in experts.local_experts]
    if hasattr(experts, "linear_fc1"):  # TEGroupedMLP (and the plugin's grouped experts)
        return [experts.linear_fc1]
    raise TypeError(f"the specialization loss cannot read activations of {type(experts).__name__}")


def route_rows(rows: torch.Tensor, dest: torch.Tensor, meta: torch.Tensor, group) -> tuple:
    """Send each row (and its integer metadata) to group rank ``dest``; differentiable in ``rows``."""
    size = dist.get_world_size(group)
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=size)
    recv_counts = torch.empty_like(send_counts)
    if size > 1:
        dist.all_to_all_single(recv_counts, send_counts, group=group)
    else:
        recv_counts.copy_(send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    received_rows = all_to_all(group, rows[order].contiguous(), recv, send)
    received_meta = meta.new_empty((sum(recv),) + tuple(meta.shape[1:]))
    if size > 1:
        dist.all_to_all_single(received_meta, meta[order].contiguous(), recv, send, group=group)
    else:
        received_meta.copy_(meta[order])
    return received_rows, received_meta


class SpecializationProbe:
    """R_sp of one MoE layer: capture, return to owners, loss, attachment and logging."""

    def __init__(self, moe_layer, *, coeff: float, include_shared: bool, tracker, num_layers: int):
        self.layer = moe_layer
        self.router, self.dispatcher, self.experts = moe_layer.router, moe_layer.token_dispatcher, moe_layer.experts
        self.config = moe_layer.config
        self.coeff, self.include_shared = coeff, include_shared
        self.tracker, self.num_layers = tracker, num_layers
        self.measure = False
        self.group = self.dispatcher.tp_ep_group
        self.group_ranks = dist.get_process_group_ranks(self.group)
        self.my_index = self.group_ranks.index(dist.get_rank())
        self.shard = self.dispatcher.tp_rank  # this rank's F-slice of the routed experts
        self.num_shards = self.dispatcher.tp_size
        self.local_offset = moe_layer.local_expert_indices[0]
        self._rows: list[torch.Tensor] = []
        self._shared_rows: torch.Tensor | None = None
        if hasattr(self.experts, "register_activation_hook"):  # grouped GEMM experts hand z over
            self.handles = [self.experts.register_activation_hook(self._capture_activation)]
        else:
            self.handles = [m.register_forward_hook(self._capture) for m in _fc1_modules(self.experts)]
        self.handles.append(self.experts.register_forward_hook(self._after_experts))
        if include_shared:
            self.handles.append(moe_layer.shared_experts.linear_fc1.register_forward_hook(self._capture_shared))
            from megatron.core import parallel_state as ps

            tp_ranks = dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())
            self.tp_peer_index = [self.group_ranks.index(r) for r in tp_ranks]

    @property
    def active(self) -> bool:
        return (self.coeff > 0 or self.measure) and self.layer.training and torch.is_grad_enabled()

    # ------------------------------------------------------------------ capture
    def _capture(self, module, inputs, output) -> None:
        if self.active:
            out, bias = output if isinstance(output, tuple) else (output, None)
            self._rows.append(_recomputed(glu_intermediate, out, bias, self.config))

    def _capture_activation(self, module, z) -> None:
        if self.active:
            self._rows.append(z)

    def _capture_shared(self, module, inputs, output) -> None:
        if self.active:
            out, bias = output if isinstance(output, tuple) else (output, None)
            z = _recomputed(glu_intermediate, out, bias, self.config)
            self._shared_rows = z.reshape(-1, z.shape[-1])

    # ------------------------------------------------------------------ where rows came from
    def _dispatch_meta(self, routing: RoutingRecord) -> torch.Tensor:
        """Per dispatched row: [owner index in the dispatch group, token index, routed experts]."""
        k = self.config.moe_router_topk
        routing_map = routing.routing_map
        num_tokens, num_experts = routing_map.shape
        experts = torch.where(routing_map, torch.arange(num_experts, device=routing_map.device), num_experts)
        experts = experts.sort(dim=-1).values[:, :k]  # routed experts, ascending; num_experts pads
        experts = torch.where(experts == num_experts, -1, experts)
        meta = torch.cat(
            [
                torch.full((num_tokens, 1), float(self.my_index), device=routing_map.device),
                torch.arange(num_tokens, device=routing_map.device, dtype=torch.float32)[:, None],
                experts.float(),
            ],
            dim=1,
        )
        clone = copy.copy(self.dispatcher)
        clone.shared_experts = None
        probs = torch.zeros(routing_map.shape, dtype=torch.float32, device=routing_map.device)
        with torch.no_grad():
            h, p = clone.dispatch_preprocess(meta, routing_map, probs)
            h, p = clone.token_dispatch(h, p)
            rows, _, _ = clone.dispatch_postprocess(h, p)
        return rows.reshape(-1, meta.shape[1]).round().long()

    # ------------------------------------------------------------------ loss
    def _after_experts(self, module, inputs, output):
        if not self.active:
            return None
        if self._rows:
            rows = torch.cat(self._rows) if len(self._rows) > 1 else self._rows[0]
        else:  # no rows reached this rank's experts: still take part in the all-to-all
            width = self.config.moe_ffn_hidden_size // self.num_shards
            rows = output[0].new_zeros(0, width)
        self._rows = []
        shared, self._shared_rows = self._shared_rows, None
        routing = self.router.moe_reg_last_routing
        tokens_per_expert = inputs[1]
        k = self.config.moe_router_topk
        meta = self._dispatch_meta(routing)
        local_expert = (
            torch.repeat_interleave(
                torch.arange(len(tokens_per_expert), device=rows.device),
                torch.as_tensor(tokens_per_expert, device=rows.device).long(),
            )
            + self.local_offset
        )
        slot = (meta[:, META_ROUTED : META_ROUTED + k] == local_expert[:, None]).long().argmax(dim=1)
        dest = meta[:, 0]
        info = torch.stack([meta[:, 1], slot, torch.full_like(slot, self.shard)], dim=1)
        if shared is not None:  # the shared expert: one more slot, sliced over TP like the experts
            t = routing.num_tokens
            owners = torch.arange(shared.shape[0], device=rows.device) // t
            dest = torch.cat([dest, torch.as_tensor(self.tp_peer_index, device=rows.device)[owners]])
            shared_info = torch.stack(
                [
                    torch.arange(shared.shape[0], device=rows.device) % t,
                    torch.full_like(owners, k),
                    torch.full_like(owners, self.shard),
                ],
                dim=1,
            )
            info = torch.cat([info, shared_info])
            rows = torch.cat([rows, shared.to(rows.dtype)])
        received, received_info = route_rows(rows, dest, info, self.group)
        slots = k + (1 if self.include_shared else 0)
        z = received.new_zeros(routing.num_tokens, slots, self.num_shards, received.shape[-1])
        z = z.index_put((received_info[:, 0], received_info[:, 1], received_info[:, 2]), received)
        z_TKF = z.reshape(routing.num_tokens, slots, -1)
        keep = routing.keep_mask()
        loss = _recomputed(specialization_loss, z_TKF, keep)
        self.tracker.record(
            "specialization_loss",
            loss.detach(),
            self.router.layer_number,
            self.num_layers,
            avg_group=self.router.tp_cp_group,
        )
        return attach_to_experts_output(output, loss, self.coeff, self.router, keep.sum())


class Specialization(RegularizerBase):
    """R_sp of every MoE layer of this rank (one probe per layer)."""

    coefficient_field = "moe_specialization_loss_coeff"

    def __init__(self, probes: list[SpecializationProbe], coeff: float):
        self.probes, self.coeff = probes, coeff

    def begin_step(self, plan: StepPlan) -> None:
        for probe in self.probes:
            probe.measure = plan.measure

    def metric_names(self, plan: StepPlan) -> list[str]:
        return ["specialization_loss"] if self.coeff > 0 or plan.measure else []

    def set_coefficient(self, value: float) -> None:
        self.coeff = value
        for probe in self.probes:
            probe.coeff = value


def build(ctx: InstallContext) -> Specialization:
    p = ctx.plugin
    include_shared = p.moe_specialization_include_shared_experts
    coeff = p.moe_specialization_loss_coeff
    probes = [
        SpecializationProbe(layer, coeff=coeff, include_shared=include_shared, **ctx.recording) for layer in ctx.layers
    ]
    return Specialization(probes, coeff)
