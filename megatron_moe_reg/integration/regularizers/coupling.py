"""R_cp inside Megatron: pairs of consecutive MoE layers, exact under recompute and pipelining.

The per-token pair term c(m⁻, m) of ``losses.coupling`` is separable: for "product",
∂c/∂m = -m⁻ and ∂c/∂m⁻ = -m; for "log" each layer's term depends on its own mass only. So
each pair's loss is attached as two halves, one per layer, each with the partner's mass
detached (sg):

    half at layer l  : λ · mean c(sg(m⁻), m)     (gradient into layer l's router)
    half at layer l⁻ : λ · mean c(m⁻, sg(m))     (gradient into layer l⁻'s router)

whose gradients sum to the gradient of λ · mean c(m⁻, m). A half is attached when its layer
runs with gradients enabled: in the ordinary forward, or in the recompute pass during
backward (full or selective ``moe`` activation recompute; the first, no-grad pass only stores
the mass). When the partner's mass is not known yet (the later layer of the pair has not run),
the half is *deferred*: an autograd node whose backward computes the gradient with the
partner's mass, which by then is known, either locally or, when the pair straddles a pipeline
boundary, received from the neighbouring stage over a dedicated point-to-point group.
Pairs whose previous MoE layer sits two or more stages back (a stage without MoE layers in
between) are skipped and counted.

Per micro-batch, each model chunk's training forward opens a *record* of masses; a layer's
with-gradient call uses the oldest record in which it has not run yet (micro-batches are
processed first-in first-out by the 1F1B and no-pipelining schedules).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from torch.profiler import record_function

from megatron_moe_reg.config import moe_layer_pattern
from megatron_moe_reg.integration.megatron.aux_loss import aux_loss_backward_scale, local_mean_scale
from megatron_moe_reg.integration.regularizers.base import InstallContext, RegularizerBase, StepPlan
from megatron_moe_reg.losses.coupling import coupling_from_masses, topk_mass
from megatron_moe_reg.losses.routing_scores import routing_distribution
from megatron_moe_reg.losses.specialization import masked_mean

_TAG_FORWARD, _TAG_BACKWARD = 7301, 7302


@dataclass
class CouplingRecord:
    """Masses of one micro-batch's forward on this pipeline stage."""

    masses: dict = field(default_factory=dict)  # layer_number -> m (detached), [T]
    grad_done: set = field(default_factory=set)  # layers that attached their halves
    received_prev: torch.Tensor | None = None  # mass of the previous stage's last MoE layer
    pending_next: torch.Tensor | None = None  # the next stage's mass, received in backward


class _DeferredHalf(torch.autograd.Function):
    """Identity on ``anchor``; backward gives ``m`` the gradient of λ·mean c(m, sg(partner))."""

    @staticmethod
    def forward(ctx, anchor, m, keep, fetch_partner, scale, variant):
        ctx.save_for_backward(m, keep)
        ctx.fetch_partner, ctx.scale, ctx.variant = fetch_partner, scale, variant
        return anchor

    @staticmethod
    def backward(ctx, grad_anchor):
        m, keep = ctx.saved_tensors
        partner = ctx.fetch_partner().to(m)
        n = keep.sum().clamp_min(1)
        if ctx.variant == "product":
            grad = -partner / n
        else:
            grad = -1.0 / (m.clamp_min(1e-20) * n)
        grad = grad * keep * ctx.scale * aux_loss_backward_scale().to(m)
        return grad_anchor, grad, None, None, None, None


class PipelineNeighbours:
    """A dedicated group per pipeline group for R_cp's point-to-point messages, so they never
    interleave with Megatron's own activation sends on the same communicator."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.group = None
        self.ranks: list[int] = []
        if self.pp_size == 1:
            return
        mine = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for ranks in sorted({tuple(r) for r in everyone}):
            group = dist.new_group(list(ranks))
            if list(ranks) == mine:
                self.group, self.ranks = group, mine

    def send(self, tensor: torch.Tensor, to_stage: int, tag: int):
        """Non-blocking send; returns (work, buffer): keep the buffer until the work completes."""
        buffer = tensor.detach().float().contiguous()
        return dist.isend(buffer, self.ranks[to_stage], group=self.group, tag=tag), buffer

    def recv(self, like: torch.Tensor, from_stage: int, tag: int) -> torch.Tensor:
        buf = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        dist.recv(buf, self.ranks[from_stage], group=self.group, tag=tag)
        return buf


class CouplingController(RegularizerBase):
    """Owns the records, the pairing of MoE layers and the attachment of R_cp's halves."""

    coefficient_field = "moe_coupling_loss_coeff"

    def __init__(
        self,
        *,
        coeff: float,
        variant: str,
        moe_layers: list[int],
        local_layers: list[int],
        layer_stage: dict[int, int],
        tracker,
        num_layers: int,
        calculate_per_token_loss: bool,
    ):
        self.coeff, self.variant = coeff, variant
        self.tracker, self.num_layers = tracker, num_layers
        self.calculate_per_token_loss = calculate_per_token_loss
        self.local = sorted(local_layers)
        self.prev = {b: a for a, b in zip(moe_layers, moe_layers[1:], strict=False)}
        self.next = {a: b for a, b in zip(moe_layers, moe_layers[1:], strict=False)}
        self.stage = layer_stage
        self.records: collections.deque[CouplingRecord] = collections.deque()
        self._pending: list = []
        self.measure = False
        self.neighbours: PipelineNeighbours | None = None
        my_stage = layer_stage[self.local[0]] if self.local else None
        self.my_stage = my_stage
        # Pairs whose previous MoE layer is two or more stages back cannot be coupled.
        self.skipped_pairs = sorted((a, b) for b, a in self.prev.items() if layer_stage[b] - layer_stage[a] > 1)

    @property
    def active(self) -> bool:
        return self.coeff > 0 or self.measure

    # ------------------------------------------------------------------ regularizer protocol
    def begin_step(self, plan: StepPlan) -> None:
        self.measure = plan.measure

    def metric_names(self, plan: StepPlan) -> list[str]:
        return ["coupling_loss"] if (self.coeff > 0 and plan.log) or plan.measure else []

    def set_coefficient(self, value: float) -> None:
        self.coeff = value

    def end_step(self) -> None:
        self.finish_step()

    def needs_neighbours(self) -> bool:
        return any(self.stage[b] - self.stage[a] == 1 for b, a in self.prev.items())

    # ------------------------------------------------------------------ records
    def begin_forward(self) -> None:
        """A model chunk starts a training forward: open a record for this micro-batch."""
        if self.active and self.local:
            self.records.append(CouplingRecord())

    def _record_for(self, layer: int, with_grad: bool) -> CouplingRecord | None:
        if not self.records:
            return None
        if not with_grad:
            return self.records[-1]
        for record in self.records:
            if layer not in record.grad_done:
                return record
        return None

    def _retire(self) -> None:
        while self.records and len(self.records[0].grad_done) == len(self.local):
            self.records.popleft()

    # ------------------------------------------------------------------ router hook
    def after_routing(
        self,
        router,
        logits: torch.Tensor,
        probs: torch.Tensor,
        routing_map: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Called by every plugin router in training; returns ``probs`` with R_cp halves attached.

        A call with gradients disabled (the first pass of a recomputed layer) only stores the
        mass; the call with gradients (ordinary forward, or the recompute pass) logs the pair
        value once and attaches the halves.
        """
        if not (self.active and router.training):
            return probs
        with record_function("moe_reg.R_cp"):  # a profiler range (benchmarks/loss_overhead.py)
            return self._after_routing(router, logits, probs, routing_map, padding_mask)

    def _after_routing(self, router, logits, probs, routing_map, padding_mask):
        layer = router.layer_number
        with_grad = torch.is_grad_enabled()
        record = self._record_for(layer, with_grad)
        if record is None:
            return probs
        first_call = layer not in record.masses
        scores = routing_distribution(logits.reshape(-1, logits.shape[-1]), router.score_function)
        m = topk_mass(scores, router.topk, routing_map)
        keep = (
            torch.ones_like(m, dtype=torch.bool) if padding_mask is None else ~padding_mask.reshape(-1).to(torch.bool)
        )
        record.masses[layer] = m.detach()
        if first_call:
            self._exchange_with_neighbours(layer, record, m)
        if not with_grad:
            return probs
        attach = self.coeff > 0
        scale = local_mean_scale(self.coeff, router.tp_cp_group.size(), self.calculate_per_token_loss, keep.sum())
        prev = self.prev.get(layer)
        if prev is not None and (prev, layer) not in self.skipped_pairs:
            m_prev = record.received_prev if self.stage[prev] != self.stage[layer] else record.masses[prev]
            assert m_prev is not None, "the previous stage's mass arrives before this layer runs"
            later_half = masked_mean(coupling_from_masses(m_prev.detach().to(m), m, self.variant), keep)
            self.tracker.record(
                "coupling_loss", later_half.detach(), layer, self.num_layers, avg_group=router.tp_cp_group
            )
            if attach:
                probs = MoEAuxLossAutoScaler.apply(probs, later_half * scale)
        nxt = self.next.get(layer)
        if attach and nxt is not None and (layer, nxt) not in self.skipped_pairs:
            probs = self._attach_earlier_half(layer, nxt, record, probs, m, keep, scale)
        record.grad_done.add(layer)
        self._retire()
        return probs

    def _attach_earlier_half(self, layer, nxt, record, probs, m, keep, scale):
        """The half of pair (layer, nxt) that reaches this layer's router."""
        if self.stage[nxt] == self.stage[layer]:
            known = record.masses.get(nxt)
            if known is not None:  # recompute: the later layer already ran in this backward
                half = masked_mean(coupling_from_masses(m, known.to(m), self.variant), keep)
                return MoEAuxLossAutoScaler.apply(probs, half * scale)

            def fetch():  # the later layer has run by the time this layer's backward runs
                return record.masses[nxt]
        else:
            fetch = self._fetch_from_next_stage(record, m)
        return _DeferredHalf.apply(probs, m, keep, fetch, scale, self.variant)

    # ------------------------------------------------------------------ pipeline neighbours
    def _exchange_with_neighbours(self, layer: int, record: CouplingRecord, m: torch.Tensor) -> None:
        """Once per micro-batch: the first MoE layer of a stage receives the previous stage's
        last mass (and, when the loss is on, sends its own back for that stage's half); the last
        MoE layer of a stage sends its mass to the next stage."""
        if self.neighbours is None:
            return
        prev, nxt = self.prev.get(layer), self.next.get(layer)
        if prev is not None and (prev, layer) not in self.skipped_pairs and self.stage[prev] != self.stage[layer]:
            record.received_prev = self.neighbours.recv(m, self.stage[prev], _TAG_FORWARD)
            if self.coeff > 0:
                self._pending.append(self.neighbours.send(m, self.stage[prev], _TAG_BACKWARD))
        if nxt is not None and (layer, nxt) not in self.skipped_pairs and self.stage[nxt] != self.stage[layer]:
            self._pending.append(self.neighbours.send(m, self.stage[nxt], _TAG_FORWARD))

    def _fetch_from_next_stage(self, record: CouplingRecord, like: torch.Tensor):
        assert self.my_stage is not None and self.neighbours is not None
        next_stage, neighbours = self.my_stage + 1, self.neighbours

        def fetch():
            if record.pending_next is None:
                record.pending_next = neighbours.recv(like.detach(), next_stage, _TAG_BACKWARD)
            return record.pending_next

        return fetch

    def finish_step(self) -> None:
        """After an optimizer step: complete outstanding sends and drop the step's records."""
        for work, _buffer in self._pending:
            work.wait()
        self._pending.clear()
        self.records.clear()


def _layer_stages(local_layers: list[int]) -> dict[int, int]:
    """Global MoE layer number -> pipeline stage, gathered over the pipeline group."""
    from megatron.core import parallel_state as ps

    mine = (ps.get_pipeline_model_parallel_rank(), local_layers)
    group = ps.get_pipeline_model_parallel_group()
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return {layer: stage for stage, layers in everyone for layer in layers}


def build(ctx: InstallContext) -> CouplingController | None:
    """The coupling controller when the model has two MoE layers or more (collective over PP)."""
    moe_numbers = [i + 1 for i, v in enumerate(moe_layer_pattern(ctx.config.moe_layer_freq, ctx.num_layers)) if v]
    if len(moe_numbers) < 2:
        return None
    local = sorted(layer.layer_number for layer in ctx.layers)
    controller = CouplingController(
        coeff=ctx.plugin.moe_coupling_loss_coeff,
        variant=ctx.plugin.moe_coupling_loss_variant,
        moe_layers=moe_numbers,
        local_layers=local,
        layer_stage=_layer_stages(local),
        tracker=ctx.tracker,
        num_layers=ctx.num_layers,
        calculate_per_token_loss=ctx.config.calculate_per_token_loss,
    )
    if controller.needs_neighbours():
        controller.neighbours = PipelineNeighbours()
    for layer in ctx.layers:
        layer.router.moe_reg_observers = (controller,)

    def begin_forward(module, args) -> None:
        if module.training:
            controller.begin_forward()

    for chunk in ctx.chunks:
        chunk.register_forward_pre_hook(begin_forward)
    return controller
