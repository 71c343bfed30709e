"""Routing-analysis metrics: pure functions on routings, activations and weights (no gradient).

Formulas and source labels are in each module; the live per-layer logging is in
``integration/regularizers/routing.py`` and the offline report in ``analysis/``.
"""

from megatron_moe_reg.metrics.geometry import router_geometry, row_orthogonality_error
from megatron_moe_reg.metrics.overlap import (
    activation_mso,
    coactivation_overlap,
    pairwise_expert_similarity,
    weight_mso,
)
from megatron_moe_reg.metrics.pathways import (
    joint_counts,
    normalized_mutual_information,
    pathway_conditional_entropy,
    pathway_mutual_information,
    top_pathway_share,
)
from megatron_moe_reg.metrics.predictability import average_ranks, load_agreement, topk_overlap
from megatron_moe_reg.metrics.routing import (
    aux_score_mass_lost,
    load_entropy,
    load_statistics,
    percentiles,
    router_distribution,
    routing_entropy,
)

__all__ = [
    "activation_mso",
    "average_ranks",
    "aux_score_mass_lost",
    "coactivation_overlap",
    "joint_counts",
    "load_agreement",
    "load_entropy",
    "load_statistics",
    "normalized_mutual_information",
    "pairwise_expert_similarity",
    "pathway_conditional_entropy",
    "pathway_mutual_information",
    "percentiles",
    "router_distribution",
    "router_geometry",
    "routing_entropy",
    "row_orthogonality_error",
    "top_pathway_share",
    "topk_overlap",
    "weight_mso",
]
