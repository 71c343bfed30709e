"""The weight-orthogonality loss and the weight-space MSO inside Megatron, exact under EP and ETP.

Every rank of a layer's EP x ETP group computes the same L_orth over *all* E experts
(``expert_weights.all_experts_gram``: the local weights are all-gathered over EP and the partial
Gram is summed over ETP). The loss is attached to the experts' output once per micro-batch with
``aux_loss.attach_local_mean_loss`` (a parameter-only loss, like the router penalties). Scale
check, as for the router penalties: each expert slice receives the sum of the EP x ETP copies'
gradients, and Megatron's DDP sums expert gradients over the expert-DP group with the factor
1/(dp x cp); since edp x ep x etp = dp x cp x tp, the net factor is tp x (coeff / tp_cp) x cp
(the autoscaler's cp factor) = coeff. With ``calculate_per_token_loss`` the token-count factors
cancel the same way. Cost per MoE layer and micro-batch: an all-gather of the layer's expert
weights over EP and an E x E Gram of length-D rows (D = 2FH/etp for fc1), forward and backward.

The weight MSO (``weight_mso_fc1``, ``weight_mso_fc2``: the loss's value without its coefficient)
costs the same all-gather and Gram without gradient. It is a function of the weights alone, so it
is measured with the other all-experts metrics (PES, activation MSO) on ``--moe-metrics-interval``
steps; on the other measured (log) steps only the kind the loss computes anyway is recorded.
"""

from __future__ import annotations

import torch

from megatron_moe_reg.integration.megatron.aux_loss import attach_to_experts_output
from megatron_moe_reg.integration.megatron.expert_weights import WEIGHT_KINDS, all_experts_gram
from megatron_moe_reg.integration.regularizers.base import InstallContext, RegularizerBase, StepPlan
from megatron_moe_reg.losses.weight_orthogonality import weight_orthogonality_from_gram


class WeightOrthogonality:
    """L_orth of one MoE layer (when ``coeff`` > 0) and its weight MSO on measured steps."""

    def __init__(self, moe_layer, *, coeff: float, kind: str, tracker, num_layers: int):
        self.layer, self.experts, self.router = moe_layer, moe_layer.experts, moe_layer.router
        self.coeff, self.kind = coeff, kind
        self.tracker, self.num_layers = tracker, num_layers
        self.ep_group = getattr(self.experts, "ep_group", None)
        self.etp_group = getattr(self.experts, "tp_group", None)
        self.measured_kinds: tuple[str, ...] = ()
        self._measured = False
        self.handle = self.experts.register_forward_hook(self._after_experts)

    def begin_step(self, kinds: tuple[str, ...]) -> None:
        """``kinds``: the weight MSOs to record this step."""
        self.measured_kinds, self._measured = kinds, False

    def measure_now(self, known: dict | None = None) -> None:
        """Record this step's weight MSOs (collective over EP x ETP; no gradient); ``known`` holds
        values already computed this step (the loss's own kind)."""
        known = known or {}
        with torch.no_grad():
            for kind in self.measured_kinds:
                value = known.get(kind)
                if value is None:
                    value = weight_orthogonality_from_gram(
                        all_experts_gram(self.experts, kind, self.ep_group, self.etp_group)
                    )
                self.tracker.record(f"weight_mso_{kind}", value.detach(), self.layer.layer_number, self.num_layers)
        self._measured = True

    def _after_experts(self, module, inputs, output):
        if not (self.layer.training and torch.is_grad_enabled()):
            return None
        loss = None
        if self.coeff > 0:
            loss = weight_orthogonality_from_gram(
                all_experts_gram(self.experts, self.kind, self.ep_group, self.etp_group)
            )
        if self.measured_kinds and not self._measured:
            self.measure_now({} if loss is None else {self.kind: loss})
        if loss is None:
            return None
        routing = self.router.moe_reg_last_routing
        return attach_to_experts_output(output, loss, self.coeff, self.router, routing.keep_mask().sum())


class WeightOrthogonalityLoss(RegularizerBase):
    """L_orth and the weight MSO of every MoE layer of this rank."""

    coefficient_field = "moe_weight_orthogonality_coeff"

    def __init__(self, modules: list[WeightOrthogonality]):
        self.modules = modules

    def begin_step(self, plan: StepPlan) -> None:
        for module in self.modules:
            module.begin_step(self.kinds(plan))

    def kinds(self, plan: StepPlan) -> tuple[str, ...]:
        """Both kinds on ``--moe-metrics-interval`` steps; the loss's own on the other measured steps."""
        if plan.expensive:
            return WEIGHT_KINDS
        if plan.measure and self.modules and self.modules[0].coeff > 0:
            return (self.modules[0].kind,)
        return ()

    def metric_names(self, plan: StepPlan) -> list[str]:
        return [f"weight_mso_{kind}" for kind in self.kinds(plan)]

    def set_coefficient(self, value: float) -> None:
        for module in self.modules:
            module.coeff = value


def build(ctx: InstallContext) -> WeightOrthogonalityLoss | None:
    """Installed when the loss is on or the weight MSO is measured (``--moe-metrics-interval``)."""
    p = ctx.plugin
    if not (p.moe_weight_orthogonality_coeff > 0 or p.moe_metrics_interval):
        return None
    coeff, kind = p.moe_weight_orthogonality_coeff, p.moe_weight_orthogonality_weights
    return WeightOrthogonalityLoss(
        [WeightOrthogonality(layer, coeff=coeff, kind=kind, **ctx.recording) for layer in ctx.layers]
    )
