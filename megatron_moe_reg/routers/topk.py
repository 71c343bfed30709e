"""Megatron's top-k router with the plugin's observation and penalties (``--moe-router-type topk``)."""

from __future__ import annotations

from megatron.core.transformer.moe.router import TopKRouter

from megatron_moe_reg.routers.base import PluginRouterMixin


class PluginTopKRouter(PluginRouterMixin, TopKRouter):
    """Megatron's top-k router, observable by the plugin."""

    def __init__(self, config, pg_collection=None, plugin=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self._init_plugin(plugin)
