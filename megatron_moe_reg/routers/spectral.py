"""Spectral-normalized linear router (SR-MoE-style Lipschitz-bounded gate; form inferred).

    logits = x · (W / σ_max(W))ᵀ · g

W is Megatron's router weight (E x H), σ_max its largest singular value from persistent power
iteration (``PluginRouterMixin.router_sigma``: one step per optimizer step, gradient through
σ = uᵀWv), g a learnable scalar gain (``--moe-router-spectral-gain`` initial value;
``--moe-router-fixed-gain`` keeps it constant). ‖W/σ‖₂ = 1, so the logits change by at most
g·‖Δx‖ when the input changes by Δx. Everything after the logits is Megatron's routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter

from megatron_moe_reg.losses.router_penalties import EPS
from megatron_moe_reg.routers.base import PluginRouterMixin


class SpectralRouter(PluginRouterMixin, TopKRouter):
    needs_sigma = True

    def __init__(self, config, pg_collection=None, plugin=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        self._register_scalar("gain", plugin.moe_router_spectral_gain, plugin.moe_router_fixed_gain)
        self._init_plugin(plugin)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype()
        W = self.weight.to(dtype) / self.router_sigma().clamp_min(EPS)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), W, bias) * self.gain.to(dtype)
