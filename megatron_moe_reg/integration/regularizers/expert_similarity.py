"""PES and activation MSO during training, on a sample of tokens that does not depend on the layout.

Sample: the first ``S`` positions of the first sequence of the step's first micro-batch, as the
MoE layer receives it (after the pre-MLP norm) on the rank with data-, tensor- and
context-parallel rank 0 of each pipeline stage (the "source"). Megatron's batch sampler gives that
rank the global batch's first sequence whatever the DP size or micro-batch count, and sequence
parallelism gives it the first positions, so the sample is the same tokens in every layout (with
sequence parallelism at most seq_length / TP positions are available).

Every expert f_e is evaluated on the sample by the ranks that hold it: the source broadcasts the
sample over its expert TP x EP group, each rank runs its local experts (fc2 partial sums summed
over expert-TP), the outputs are gathered over EP, and the source computes
``metrics.pairwise_expert_similarity`` (SimBal's PES) and ``metrics.activation_mso`` and records
them (only the source records; the report sums over the pipeline group only, so rank 0 prints it).
Cost per MoE layer at each metrics step: E_local expert passes over S tokens per rank and one gather
of E x S x H values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_moe_reg.integration.megatron.expert_weights import local_expert_outputs
from megatron_moe_reg.integration.regularizers.base import InstallContext, RegularizerBase, StepPlan
from megatron_moe_reg.metrics.overlap import activation_mso, pairwise_expert_similarity


def _is_source() -> bool:
    from megatron.core import parallel_state as ps

    return (
        ps.get_data_parallel_rank() == 0
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )


class ExpertSimilarityProbe:
    def __init__(self, moe_layer, *, sample_tokens: int, tracker, num_layers: int):
        self.layer, self.experts = moe_layer, moe_layer.experts
        self.sample_tokens, self.tracker, self.num_layers = sample_tokens, tracker, num_layers
        self.group = moe_layer.token_dispatcher.tp_ep_group
        self.ep_group = getattr(self.experts, "ep_group", None)
        self.etp_group = getattr(self.experts, "tp_group", None)
        flags = torch.zeros(dist.get_world_size(self.group), dtype=torch.int64)
        flags[dist.get_group_rank(self.group, dist.get_rank())] = int(_is_source())
        dist.all_reduce(flags, group=self.group)
        sources = torch.nonzero(flags).flatten().tolist()
        self.source = dist.get_global_rank(self.group, sources[0]) if sources else None
        self.is_source = self.source == dist.get_rank()
        for name in ("pes", "activation_mso"):  # the same reduction on every rank: a sum over PP only
            tracker.ensure(name, num_layers, reduce_group=None, avg_group=None, needs_dp_avg=False)
        self.active = False
        self.handle = moe_layer.register_forward_pre_hook(self._before_layer, with_kwargs=True)

    def begin_step(self, active: bool) -> None:
        self.active = active

    def _before_layer(self, module, args, kwargs):
        if not (self.active and self.layer.training and torch.is_grad_enabled()):
            return None
        self.active = False  # the step's first micro-batch only
        if self.source is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            self._measure(hidden)
        return None

    def _measure(self, hidden: torch.Tensor) -> None:
        n = torch.tensor([min(self.sample_tokens, hidden.shape[0])], device=hidden.device)
        dist.broadcast(n, src=self.source, group=self.group)
        sample = hidden[: int(n), 0].contiguous() if self.is_source else hidden.new_empty(int(n), hidden.shape[-1])
        dist.broadcast(sample, src=self.source, group=self.group)
        out = local_expert_outputs(self.experts, sample, len(self.layer.local_expert_indices))
        if self.etp_group is not None and dist.get_world_size(self.etp_group) > 1:
            dist.all_reduce(out, group=self.etp_group)
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            parts = [torch.empty_like(out) for _ in range(dist.get_world_size(self.ep_group))]
            dist.all_gather(parts, out, group=self.ep_group)
            out = torch.cat(parts)
        if self.is_source:
            for name, value in (("pes", pairwise_expert_similarity(out)), ("activation_mso", activation_mso(out))):
                self.tracker.record(name, value, self.layer.layer_number, self.num_layers, needs_dp_avg=False)


class ExpertSimilarity(RegularizerBase):
    """PES and activation MSO of every MoE layer, at ``--moe-metrics-interval`` steps (no gradient)."""

    def __init__(self, probes: list[ExpertSimilarityProbe]):
        self.probes = probes

    def begin_step(self, plan: StepPlan) -> None:
        for probe in self.probes:
            probe.begin_step(plan.expensive)

    def metric_names(self, plan: StepPlan) -> list[str]:
        return ["pes", "activation_mso"] if plan.expensive else []


def build(ctx: InstallContext) -> ExpertSimilarity | None:
    if not ctx.plugin.moe_metrics_interval:
        return None
    sample = ctx.plugin.moe_metrics_sample_tokens
    return ExpertSimilarity(
        [ExpertSimilarityProbe(layer, sample_tokens=sample, **ctx.recording) for layer in ctx.layers]
    )
