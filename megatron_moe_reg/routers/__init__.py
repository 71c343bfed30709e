"""Routers, by ``--moe-router-type`` name. Each is a subclass of Megatron's ``TopKRouter``."""

from __future__ import annotations

from megatron_moe_reg.integration.router import PluginTopKRouter

ROUTERS = {
    "topk": PluginTopKRouter,
}


def router_class(name: str) -> type:
    return ROUTERS[name]
