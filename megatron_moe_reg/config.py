"""Options of the plugin itself (losses, routers, experts), validated in one place.

Each option is a flag of ``moe-reg pretrain`` and of the Megatron-LM add-on entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_moe_reg.training.arguments import RunConfig


@dataclass
class PluginConfig:
    """Plugin options; all off by default, so the model is Megatron's own."""

    def validate(self, run: "RunConfig | None" = None) -> None:
        """Check the plugin options against each other and against the run. Raises ConfigError."""

    @property
    def any_enabled(self) -> bool:
        return False
