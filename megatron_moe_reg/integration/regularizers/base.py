"""What a regularizer is to the plugin: a small protocol, the step plan it follows, what it is built from.

A regularizer (a loss, or a measurement without gradient) is built once per model by a builder
in the registry (``regularizers.REGULARIZERS``) from an ``InstallContext``, and then driven by
``install.Regularizers`` every step:

    begin_step(plan)       before forward/backward (``plan``: is it a measured step, an expensive one)
    metric_names(plan)     the names it records into the plugin tracker this step (same on every rank)
    end_step()             after the optimizer step
    report(...)            values it reduces itself, beside the tracker's (most return {})
    set_coefficient(value) change its coefficient between steps (``coefficient_field`` names it)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from megatron_moe_reg.config import PluginConfig
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.integration.megatron.tracker import PluginMetricsTracker

if TYPE_CHECKING:
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass(frozen=True)
class StepPlan:
    """What one training step measures (``install.StepPolicy`` decides)."""

    measure: bool = False  # a log-interval step: every loss and routing metric, with or without gradient
    expensive: bool = False  # also PES and activation MSO (``--moe-metrics-interval``)
    log: bool = True  # a log step: the losses report their values, averaged since the last report


@dataclass
class InstallContext:
    """What a builder gets: the options, the model's MoE layers and chunks, and where to record."""

    plugin: PluginConfig
    config: TransformerConfig
    layers: list[MoELayer]  # the MoE layers of this rank, in layer order
    chunks: list[Any]  # the unwrapped model chunks (GPTModel)
    tracker: PluginMetricsTracker

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def recording(self) -> dict[str, Any]:
        """Where a per-layer module records: ``tracker`` and the model's ``num_layers``."""
        return {"tracker": self.tracker, "num_layers": self.num_layers}


class Regularizer(Protocol):
    @property
    def coefficient_field(self) -> str | None: ...

    def begin_step(self, plan: StepPlan) -> None: ...

    def metric_names(self, plan: StepPlan) -> list[str]: ...

    def end_step(self) -> None: ...

    def report(self, iteration: int, writer: Any, per_layer: bool) -> dict[str, float]: ...

    def set_coefficient(self, value: float) -> None: ...


class RegularizerBase:
    """No-op defaults for the protocol; a component overrides what it uses."""

    coefficient_field: ClassVar[str | None] = None  # the PluginConfig field of its coefficient

    def begin_step(self, plan: StepPlan) -> None:
        pass

    def metric_names(self, plan: StepPlan) -> list[str]:
        return []

    def end_step(self) -> None:
        pass

    def report(self, iteration: int, writer: Any, per_layer: bool) -> dict[str, float]:
        return {}

    def set_coefficient(self, value: float) -> None:
        raise ConfigError(f"{type(self).__name__} has no coefficient")
