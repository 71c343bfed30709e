"""Installs the plugin's losses and measurements on a built Megatron model, and runs their steps.

``install(model_chunks, plugin, policy)`` finds the MoE layers, checks that their routers are
plugin routers, builds every regularizer of the registry (``regularizers.REGULARIZERS``) and
returns a ``Regularizers`` handle. Both drivers (``moe-reg pretrain`` and the Megatron-LM add-on)
call it the same way each step:

    plan = regs.begin_step(step)          # before forward/backward; the policy decides what it measures
    values = regs.finish_step(step, tb)   # after the optimizer step: end, reduce over ranks, report

``router_builder`` is the ``MoESubmodules.router`` of a run (None when Megatron's router is kept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_moe_reg.config import ModelShape, PluginConfig
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.flags import flag_name
from megatron_moe_reg.integration.megatron import compat
from megatron_moe_reg.integration.megatron.modules import moe_layers, unwrap
from megatron_moe_reg.integration.megatron.tracker import PluginMetricsTracker
from megatron_moe_reg.integration.regularizers import REGULARIZERS, InstallContext, Regularizer, StepPlan
from megatron_moe_reg.routers import router_class
from megatron_moe_reg.routers.base import PluginRouterMixin


def router_builder(plugin: PluginConfig, shape: ModelShape) -> Callable[..., Any] | None:
    """The router builder for the MoE layers: the plugin's when any plugin feature is on."""
    if not shape.num_experts or not plugin.any_enabled:
        return None
    return compat.router_builder(router_class(plugin.moe_router_type), plugin=plugin)


@dataclass(frozen=True)
class StepPolicy:
    """Which steps measure (every ``log_interval``-th) and which also run PES / activation MSO
    (every ``metrics_interval``-th); steps are counted from 1."""

    log_interval: int
    metrics_interval: int = 0
    measure_enabled: bool = True  # --moe-reg-measure

    @classmethod
    def of(cls, plugin: PluginConfig, log_interval: int) -> StepPolicy:
        return cls(log_interval, plugin.moe_metrics_interval, plugin.moe_reg_measure)

    def is_log_step(self, step: int) -> bool:
        return step % self.log_interval == 0

    def plan(self, step: int) -> StepPlan:
        measure = self.is_log_step(step) and self.measure_enabled
        expensive = bool(self.metrics_interval) and step % self.metrics_interval == 0
        return StepPlan(measure=measure, expensive=expensive, log=self.is_log_step(step))


CONSOLE_METRICS = frozenset({"routing_entropy", "load_max_violation", "dead_experts", "pes"})


def on_console(key: str, loss_layers: bool = False) -> bool:
    """Whether a reported value is shown in the console line of a driver: the losses (with
    ``loss_layers``, also per layer) and a few routing summaries (``CONSOLE_METRICS``); the other
    per-layer values, percentiles over layers and metrics go to TensorBoard, W&B and JSON lines."""
    if "_layer_" in key:
        return loss_layers and key.split("_layer_")[0].endswith("loss")
    if key.endswith(("_p50", "_p90", "_p95")):
        return False
    return key.endswith("loss") or key in CONSOLE_METRICS


def _check_model(config: Any, layers: list, plugin: PluginConfig) -> None:
    if config.mtp_num_layers:
        raise ConfigError("the plugin's losses do not support multi-token prediction layers yet (--mtp-num-layers)")
    for layer in layers:
        if not isinstance(layer.router, PluginRouterMixin):
            raise ConfigError(
                f"MoE layer {layer.layer_number} uses {type(layer.router).__name__}; "
                "build the model with the plugin's block spec (plugin routers)"
            )
    if getattr(config, "use_transformer_engine_op_fuser", False):
        raise ConfigError(
            "the plugin reads expert activations through module hooks, which "
            "TransformerEngine's op fuser bypasses; turn off use_transformer_engine_op_fuser"
        )
    if getattr(config, "cuda_graph_impl", "none") not in (None, "none") or getattr(config, "enable_cuda_graph", False):
        raise ConfigError(
            "the plugin's losses and measurements need eager MoE layers; "
            "CUDA graphs (cuda_graph_impl / enable_cuda_graph) bypass them"
        )
    if getattr(config, "moe_router_padding_for_quantization", False) and plugin.any_enabled:
        raise ConfigError(
            "the specialization loss cannot use --moe-router-padding-for-quantization (padding rows have no "
            "owner token); turn one of them off"
        )
    if getattr(config, "moe_pad_expert_input_to_capacity", False) and plugin.any_enabled:
        raise ConfigError(
            "the specialization loss cannot use --moe-pad-expert-input-to-capacity (padding rows have no owner token)"
        )


class Regularizers:
    """The installed losses and measurements of one model (all its chunks)."""

    def __init__(self, model_chunks: list, plugin: PluginConfig, policy: StepPolicy):
        self.plugin, self.policy = plugin, policy
        self.tracker = PluginMetricsTracker()  # this model's metrics (sized by its layer count)
        chunks = [unwrap(c) for c in model_chunks]
        layers = [layer for c in chunks for layer in moe_layers(c)]
        self.config = chunks[0].config
        self.num_layers: int = self.config.num_layers
        _check_model(self.config, layers, plugin)
        for layer in layers:
            layer.router.tracker = self.tracker
        self.routers = [layer.router for layer in layers]
        ctx = InstallContext(plugin=plugin, config=self.config, layers=layers, chunks=chunks, tracker=self.tracker)
        self.components: dict[str, Regularizer] = {}
        for name, build in REGULARIZERS.items():
            component = build(ctx)
            if component is not None:
                self.components[name] = component
        self.step_id = 0
        self.plan = StepPlan()

    @property
    def skipped_coupling_pairs(self) -> list:
        coupling = self.components.get("coupling")
        return list(getattr(coupling, "skipped_pairs", []))

    def names(self) -> list[str]:
        """The metrics this step records into the tracker (identical on every rank)."""
        return [name for component in self.components.values() for name in component.metric_names(self.plan)]

    def set_coefficients(self, values: dict[str, float]) -> None:
        """Change coefficients between steps, by PluginConfig field (a schedule, or an A/B benchmark)."""
        for field_name, value in values.items():
            owners = [c for c in self.components.values() if c.coefficient_field == field_name]
            if value > 0 and not owners:
                raise ConfigError(
                    f"{flag_name(field_name)}: its regularizer was not installed (off at start, or the model "
                    "does not have what it needs)"
                )
            setattr(self.plugin, field_name, value)
            for component in owners:
                component.set_coefficient(value)

    # ------------------------------------------------------------------ the step, for every driver
    def begin_step(self, step: int, plan: StepPlan | None = None) -> StepPlan:
        """Before forward/backward of training step ``step`` (from 1); ``plan`` overrides the policy."""
        plan = plan if plan is not None else self.policy.plan(step)
        self.plan = StepPlan(
            measure=plan.measure and self.plugin.moe_reg_measure, expensive=plan.expensive, log=plan.log or plan.measure
        )
        self.step_id += 1
        for router in self.routers:
            router.moe_reg_step = self.step_id
            router.moe_reg_measure = self.plan.measure
        for component in self.components.values():
            component.begin_step(self.plan)
        return self.plan

    def finish_step(self, step: int, writer: Any = None, per_layer: bool = True) -> dict[str, float]:
        """After the optimizer step: end every component's step, then reduce and report this step's
        values over all ranks (collective: call on every rank); TensorBoard scalars when ``writer``."""
        for component in self.components.values():
            component.end_step()
        names = self.names()
        out: dict[str, float] = {}
        if names:
            out = self.tracker.report(names, self.num_layers, step, writer=writer, per_layer=per_layer)
        for component in self.components.values():
            out.update(component.report(step, writer, per_layer))
        return out


def install(model_chunks: list, plugin: PluginConfig, policy: StepPolicy | None = None) -> Regularizers:
    """Install on built (and wrapped) model chunks; ``policy`` defaults to measuring every step."""
    return Regularizers(model_chunks, plugin, policy or StepPolicy.of(plugin, log_interval=1))
