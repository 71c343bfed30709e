"""Regularization losses: pure torch functions (formulas and sources in each module)."""

from megatron_moe_reg.losses.coupling import coupling_loss, topk_mass
from megatron_moe_reg.losses.router_penalties import spectral_norm, spectral_penalty, stable_rank, stable_rank_penalty
from megatron_moe_reg.losses.routing_scores import routing_distribution
from megatron_moe_reg.losses.specialization import specialization_loss

__all__ = [
    "coupling_loss",
    "routing_distribution",
    "specialization_loss",
    "spectral_norm",
    "spectral_penalty",
    "stable_rank",
    "stable_rank_penalty",
    "topk_mass",
]
