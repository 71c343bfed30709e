"""Live routing metrics of every MoE layer: expert load over the logging window, routing entropy.

Load: each router adds its routing map's column sums (kept tokens only, calls with gradients
enabled, so activation recompute counts a micro-batch once) to ``counts[layer, expert]`` on
every training step. At the report the counts are summed over every rank that routes distinct
tokens: the pipeline group (disjoint layers), the data-parallel x context-parallel group and,
with sequence parallelism, the tensor-parallel group (without it TP ranks route the same
tokens). The statistics (``metrics.load_statistics_tensors``) are then computed per layer from the
global counts, so they equal the single-process values for any DP/TP/EP/PP layout.

Routing entropy (``metrics.routing_entropy``) is recorded through the plugin tracker on measured
steps, a local token mean averaged like Megatron's z-loss (TP x CP, then DP), and so, for sigmoid
and sqrtsoftplus scores, is the share of their mass that Megatron's aux-loss normalization drops
(``aux_loss_score_mass_lost``, ``metrics.aux_score_mass_lost``); so is the router
geometry (σ_max, stable rank, row orthogonality, conditioning, basis orthonormality;
``metrics.geometry``, recorded by ``routers.base``), once per measured step and router.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_moe_reg.config import PluginConfig
from megatron_moe_reg.integration.megatron.tracker import metrics_device
from megatron_moe_reg.integration.regularizers.base import InstallContext, RegularizerBase, StepPlan
from megatron_moe_reg.metrics.routing import load_statistics_tensors, percentiles


class RoutingStats:
    def __init__(self, num_layers: int, num_experts: int, sequence_parallel: bool):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=metrics_device())
        self.sequence_parallel = sequence_parallel

    def add(self, layer_number: int, routing_map: torch.Tensor, keep_mask: torch.Tensor) -> None:
        with torch.no_grad():  # no host-device synchronization
            kept = routing_map & keep_mask.reshape(-1, 1)
            self.counts[layer_number - 1] += kept.sum(dim=0).to(self.counts)

    def global_counts(self) -> torch.Tensor:
        """counts summed over all ranks (collective; call on every rank)."""
        from megatron.core import parallel_state as ps

        counts = self.counts.clone()
        dist.all_reduce(counts, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=True))
        if self.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(counts, group=ps.get_tensor_model_parallel_group())
        return counts

    def report(self, iteration: int, writer=None, per_layer: bool = True, prefix: str = "moe_reg") -> dict[str, float]:
        """Per-layer load statistics of the window since the last report, their mean and p50/p90/p95
        over layers; clears the window. Collective."""
        counts = self.global_counts()
        self.counts.zero_()
        stats = load_statistics_tensors(counts)
        host = torch.stack([counts.sum(-1) > 0, *stats.values()]).tolist()  # one host read
        layers = [i for i, present in enumerate(host[0]) if present]
        if not layers:
            return {}
        out: dict[str, float] = {}
        for name, row in zip(stats, host[1:], strict=True):
            values = [row[i] for i in layers]
            out[name] = sum(values) / len(values)
            out.update({f"{name}_{q}": v for q, v in percentiles(values).items()})
            if per_layer:
                out.update({f"{name}_layer_{i}": row[i] for i in layers})
        if writer is not None:
            for key, value in out.items():
                writer.add_scalar(f"{prefix}/{key}", value, iteration)
        return out


GEOMETRY = (
    "router_sigma_max",
    "router_stable_rank",
    "router_row_orthogonality_error",
    "router_condition_number",
    "router_svd_entropy",
    "router_row_cosine_mean",
)


class RoutingMetrics(RegularizerBase):
    """Routing entropy, router geometry (recorded by the plugin routers) and expert load statistics."""

    def __init__(self, stats: RoutingStats, plugin: PluginConfig, score_function: str):
        self.stats, self.plugin, self.score_function = stats, plugin, score_function
        self.measure = False

    def begin_step(self, plan: StepPlan) -> None:
        self.measure = plan.measure

    def metric_names(self, plan: StepPlan) -> list[str]:
        if not plan.measure:
            return []
        names = ["routing_entropy", *GEOMETRY]
        if self.score_function != "softmax":
            names.append("aux_loss_score_mass_lost")
        if self.plugin.moe_router_type in ("ermoe", "emoe"):
            names.append("router_basis_orthonormality_error")
        if self.plugin.moe_router_type == "ermoe" and self.plugin.moe_eigen_threshold is not None:
            names.append("eigen_qualified_fraction")
        return names

    def report(self, iteration: int, writer, per_layer: bool) -> dict[str, float]:
        return self.stats.report(iteration, writer=writer, per_layer=per_layer) if self.measure else {}


def build(ctx: InstallContext) -> RoutingMetrics | None:
    if not ctx.plugin.moe_reg_measure:
        return None
    stats = RoutingStats(ctx.num_layers, ctx.config.num_moe_experts, ctx.config.sequence_parallel)
    for layer in ctx.layers:
        layer.router.moe_reg_stats = stats
    return RoutingMetrics(stats, ctx.plugin, ctx.config.moe_router_score_function)
