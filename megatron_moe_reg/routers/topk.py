"""Megatron's top-k router with the plugin's observation and penalties (``--moe-router-type topk``)."""

from megatron_moe_reg.integration.router import PluginTopKRouter

__all__ = ["PluginTopKRouter"]
