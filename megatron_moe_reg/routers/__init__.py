"""Routers, by ``--moe-router-type`` name; each is a subclass of Megatron's ``TopKRouter``.

Functional API: ``eigenbasis_scores(x_TH, bases_EHr) -> scores_TE``, ``orthonormal_basis(A)``,
``prototype_logits(x_TH, prototypes_EH, temperature)``, ``emoe_logits(...)``.
"""

from __future__ import annotations

from megatron_moe_reg.config import ROUTER_TYPES
from megatron_moe_reg.routers.eigenbasis import EigenbasisRouter, eigenbasis_scores, orthonormal_basis
from megatron_moe_reg.routers.emoe import EMoERouter, emoe_logits
from megatron_moe_reg.routers.prototype import PrototypeRouter, prototype_logits
from megatron_moe_reg.routers.spectral import SpectralRouter
from megatron_moe_reg.routers.topk import PluginTopKRouter

ROUTERS = {
    "topk": PluginTopKRouter,
    "spectral": SpectralRouter,
    "prototype": PrototypeRouter,
    "ermoe": EigenbasisRouter,
    "emoe": EMoERouter,
}
assert tuple(ROUTERS) == ROUTER_TYPES


def router_class(name: str) -> type:
    return ROUTERS[name]


__all__ = ["ROUTERS", "router_class", "eigenbasis_scores", "orthonormal_basis", "prototype_logits", "emoe_logits"]
