"""Installs the plugin's losses and measurements on a built Megatron model.

``install(model_chunks, plugin_config)`` finds the MoE layers, hooks the specialization probes
onto their experts and the coupling controller onto their routers (which must be plugin
routers), and returns a ``Regularizers`` handle that the training loop calls each step:

    regs.begin_step(measure=...)   # before forward/backward
    regs.end_step()                # after the optimizer step
    regs.report(iteration, writer) # on every rank: reduced per-layer values
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_moe_reg.config import PluginConfig, moe_layer_pattern
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.integration.coupling import CouplingController, PipelineNeighbours
from megatron_moe_reg.integration.expert_similarity import ExpertSimilarityProbe
from megatron_moe_reg.integration.orthogonality import WeightOrthogonality
from megatron_moe_reg.integration.router import PluginRouterMixin
from megatron_moe_reg.integration.routing_stats import RoutingStats
from megatron_moe_reg.integration.specialization import SpecializationProbe
from megatron_moe_reg.integration.tracker import get_tracker


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def moe_layers(chunk: torch.nn.Module) -> list:
    """The MoE layers of a model chunk, in layer order."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in chunk.modules() if isinstance(m, MoELayer)]


def _layer_stages(local_layers: list[int]) -> dict[int, int]:
    """Global MoE layer number -> pipeline stage, gathered over the pipeline group."""
    from megatron.core import parallel_state as ps

    mine = (ps.get_pipeline_model_parallel_rank(), local_layers)
    group = ps.get_pipeline_model_parallel_group()
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return {layer: stage for stage, layers in everyone for layer in layers}


class Regularizers:
    """The installed losses and measurements of one model (all its chunks)."""

    def __init__(self, model_chunks: list, plugin: PluginConfig):
        self.plugin = plugin
        self.tracker = get_tracker()
        chunks = [_unwrap(c) for c in model_chunks]
        layers = [layer for c in chunks for layer in moe_layers(c)]
        self.config = chunks[0].config
        self.num_layers = self.config.num_layers
        if self.config.mtp_num_layers:
            raise ConfigError("the plugin's losses do not support multi-token prediction layers yet "
                              "(--mtp-num-layers)")
        for layer in layers:
            if not isinstance(layer.router, PluginRouterMixin):
                raise ConfigError(f"MoE layer {layer.layer_number} uses {type(layer.router).__name__}; "
                                  "build the model with the plugin's block spec (plugin routers)")
            layer.router.tracker = self.tracker
        self.routers = [layer.router for layer in layers]
        self.step_id = 0
        if getattr(self.config, "use_transformer_engine_op_fuser", False):
            raise ConfigError("the plugin reads expert activations through module hooks, which "
                              "TransformerEngine's op fuser bypasses; turn off use_transformer_engine_op_fuser")
        if getattr(self.config, "cuda_graph_impl", "none") not in (None, "none") \
                or getattr(self.config, "enable_cuda_graph", False):
            raise ConfigError("the plugin's losses and measurements need eager MoE layers; "
                              "CUDA graphs (cuda_graph_impl / enable_cuda_graph) bypass them")
        if getattr(self.config, "moe_pad_expert_input_to_capacity", False) and plugin.any_enabled:
            raise ConfigError("the specialization loss cannot use --moe-pad-expert-input-to-capacity "
                              "(padding rows have no owner token)")
        self.probes = [SpecializationProbe(layer, coeff=plugin.moe_specialization_loss_coeff,
                                           include_shared=plugin.moe_specialization_include_shared_experts,
                                           tracker=self.tracker, num_layers=self.num_layers)
                       for layer in layers]
        self.orthogonality = [
            WeightOrthogonality(layer, coeff=plugin.moe_weight_orthogonality_coeff,
                                kind=plugin.moe_weight_orthogonality_weights, tracker=self.tracker,
                                num_layers=self.num_layers)
            for layer in layers] if (plugin.moe_weight_orthogonality_coeff > 0 or plugin.moe_reg_measure) else []
        self.similarity = [ExpertSimilarityProbe(layer, sample_tokens=plugin.moe_metrics_sample_tokens,
                                                 tracker=self.tracker, num_layers=self.num_layers)
                           for layer in layers] if plugin.moe_metrics_interval else []
        self.routing_stats: Optional[RoutingStats] = None
        if plugin.moe_reg_measure:
            self.routing_stats = RoutingStats(self.num_layers, self.config.num_moe_experts,
                                              self.config.sequence_parallel)
            for layer in layers:
                layer.router.moe_reg_stats = self.routing_stats
        local = sorted(layer.layer_number for layer in layers)
        moe_numbers = [i + 1 for i, v in enumerate(moe_layer_pattern(self.config.moe_layer_freq, self.num_layers)) if v]
        self.coupling: Optional[CouplingController] = None
        if len(moe_numbers) >= 2:
            self.coupling = CouplingController(
                coeff=plugin.moe_coupling_loss_coeff, variant=plugin.moe_coupling_loss_variant,
                moe_layers=moe_numbers, local_layers=local, layer_stage=_layer_stages(local),
                tracker=self.tracker, num_layers=self.num_layers,
                calculate_per_token_loss=self.config.calculate_per_token_loss)
            if self.coupling.needs_neighbours():
                self.coupling.neighbours = PipelineNeighbours()
            for layer in layers:
                layer.router.moe_reg_observers = (self.coupling,)
            for chunk in chunks:
                chunk.register_forward_pre_hook(self._begin_forward)
        self.measure = False
        self.expensive = False

    @property
    def skipped_coupling_pairs(self) -> list:
        return self.coupling.skipped_pairs if self.coupling else []

    def _begin_forward(self, module, args) -> None:
        if module.training and self.coupling is not None:
            self.coupling.begin_forward()

    def names(self, measured: bool) -> list[str]:
        """The metrics this step produces (identical on every rank)."""
        p = self.plugin
        out = []
        if p.moe_specialization_loss_coeff > 0 or (measured and p.moe_reg_measure):
            out.append("specialization_loss")
        if self.coupling is not None and (p.moe_coupling_loss_coeff > 0 or (measured and p.moe_reg_measure)):
            out.append("coupling_loss")
        if measured and p.moe_reg_measure:
            out += ["routing_entropy", "router_sigma_max", "router_stable_rank", "router_row_orthogonality_error",
                    "weight_mso_fc1", "weight_mso_fc2"]
            if p.moe_router_type in ("ermoe", "emoe"):
                out.append("router_basis_orthonormality_error")
            if p.moe_router_type == "ermoe" and p.moe_eigen_threshold is not None:
                out.append("eigen_qualified_fraction")
        if self.expensive:
            out += ["pes", "activation_mso"]
        return out

    def set_coefficients(self, specialization: float, coupling: float,
                         orthogonality: Optional[float] = None) -> None:
        """Change λ_sp, λ_cp (and λ_orth) between steps (e.g. a coefficient schedule or an A/B benchmark)."""
        self.plugin.moe_specialization_loss_coeff = specialization
        self.plugin.moe_coupling_loss_coeff = coupling
        for probe in self.probes:
            probe.coeff = specialization
        if self.coupling is not None:
            self.coupling.coeff = coupling
        if orthogonality is not None:
            if orthogonality > 0 and not self.orthogonality:
                raise ConfigError("the weight-orthogonality loss was not installed (--no-moe-reg-measure and "
                                  "--moe-weight-orthogonality-coeff 0 at start)")
            self.plugin.moe_weight_orthogonality_coeff = orthogonality
            for module in self.orthogonality:
                module.coeff = orthogonality

    def begin_step(self, measure: bool, expensive: bool = False) -> None:
        """``measure``: a log-interval step; ``expensive``: also PES / activation MSO (metrics interval)."""
        self.measure = measure and self.plugin.moe_reg_measure
        self.expensive = expensive and bool(self.similarity)
        for probe in self.similarity:
            probe.begin_step(self.expensive)
        self.step_id += 1
        for router in self.routers:
            router.moe_reg_step = self.step_id
            router.moe_reg_measure = self.measure
        for probe in self.probes:
            probe.measure = self.measure
        for orthogonality in self.orthogonality:
            orthogonality.begin_step(self.measure)
        if self.coupling is not None:
            self.coupling.measure = self.measure

    def end_step(self) -> None:
        if self.coupling is not None:
            self.coupling.finish_step()

    def report(self, iteration: int, writer=None, per_layer: bool = True) -> dict[str, float]:
        """Reduce this step's values over all ranks (call on every rank)."""
        names = self.names(self.measure)
        out = {}
        if names:
            out = self.tracker.report(names, self.num_layers, iteration, writer=writer, per_layer=per_layer)
        if self.measure and self.routing_stats is not None:
            out.update(self.routing_stats.report(iteration, writer=writer, per_layer=per_layer))
        return out


def install(model_chunks: list, plugin: PluginConfig) -> Regularizers:
    return Regularizers(model_chunks, plugin)
