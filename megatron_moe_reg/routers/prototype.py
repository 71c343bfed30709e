"""Prototype (distance) router of SR-MoE (arXiv 2601.03889; [S] in ../shared/reference/papers.md §2).

    logits_e = - ‖x - μ_e‖² / τ = -(‖x‖² - 2 x·μ_e + ‖μ_e‖²) / τ

μ (E x H) are learnable prototypes (Megatron's router weight holds them, so they are initialized,
tagged for TP reduction and checkpointed like it) and τ a learnable temperature (``--moe-prototype-
temperature`` initial value, stored as log τ; ``--moe-prototype-fixed-temperature`` keeps it).
Computed with one matmul, never materializing the T x E x H differences. The softmax of these
logits is SR-MoE's w_i = exp(-‖z - μ_i‖²/τ) / Σ_j exp(-‖z - μ_j‖²/τ). The penalties act on μ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter

from megatron_moe_reg.routers.base import PluginRouterMixin


def prototype_logits(x_TH: torch.Tensor, prototypes_EH: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """-‖x - μ_e‖² / τ for every token and prototype, [T, E], without a T x E x H tensor."""
    sq_dist = x_TH.pow(2).sum(-1, keepdim=True) - 2.0 * F.linear(x_TH, prototypes_EH) + prototypes_EH.pow(2).sum(-1)
    return -sq_dist.clamp_min(0.0) / temperature


class PrototypeRouter(PluginRouterMixin, TopKRouter):
    def __init__(self, config, pg_collection=None, plugin=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self._register_scalar(
            "log_temperature", math.log(plugin.moe_prototype_temperature), plugin.moe_prototype_fixed_temperature
        )
        self._init_plugin(plugin)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype()
        x = input.to(dtype)
        return prototype_logits(
            x.reshape(-1, x.shape[-1]), self.weight.to(dtype), self.log_temperature.to(dtype).exp()
        ).reshape(*x.shape[:-1], -1)
