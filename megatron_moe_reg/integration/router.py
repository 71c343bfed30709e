"""The plugin's base for routers: Megatron's ``TopKRouter`` with observable routing.

``PluginRouterMixin.routing`` runs Megatron's routing unchanged (z-loss, top-k with any score
function, expert bias, group-limited routing, capacity, aux losses), then keeps this forward's
routing for the specialization loss and lets the installed observers (the coupling loss)
attach their losses to the returned probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter


@dataclass
class RoutingRecord:
    """One forward's routing on this rank (its sequence-parallel shard of the micro-batch)."""

    routing_map: torch.Tensor  # [T, E] bool
    padding_mask: Optional[torch.Tensor]  # [T] bool, True = padding (Megatron's router convention)

    @property
    def num_tokens(self) -> int:
        return self.routing_map.shape[0]

    def keep_mask(self) -> torch.Tensor:
        if self.padding_mask is None:
            return torch.ones(self.num_tokens, dtype=torch.bool, device=self.routing_map.device)
        return ~self.padding_mask.reshape(-1).to(torch.bool)


class PluginRouterMixin:
    """Mix in before a ``TopKRouter`` (sub)class."""

    moe_reg_observers: tuple = ()
    moe_reg_last_routing: Optional[RoutingRecord] = None

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.training:
            flat_mask = None if padding_mask is None else padding_mask.reshape(-1)
            self.moe_reg_last_routing = RoutingRecord(routing_map, flat_mask)
            for observer in self.moe_reg_observers:
                probs = observer.after_routing(self, logits, probs, routing_map, flat_mask)
        return probs, routing_map


class PluginTopKRouter(PluginRouterMixin, TopKRouter):
    """Megatron's top-k router (``--moe-router-type topk``), observable by the plugin."""
