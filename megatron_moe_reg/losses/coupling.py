"""Cross-layer coupling loss R_cp (arXiv 2602.14159, paper Eq. 7; exact form inferred).

The paper "maximizes joint Top-k routing probabilities across adjacent layers" (abstract).
Its Eq. 7 was not readable; the form used here is inferred (../shared/reference/papers.md §1):
for an MoE layer l and the previous MoE layer l⁻ (previous in the ``moe_layer_freq`` pattern,
not layer_number - 1), with s the full routing distribution over all E experts and
TopK_l(i) the experts token i is routed to at layer l,

    m_i^l = Σ_{e ∈ TopK_l(i)} s_i^{l,e}                       (top-k routing mass)
    Σ_{e ∈ TopK_l⁻} Σ_{ν ∈ TopK_l} s^{l⁻,e} s^{l,ν} = m^{l⁻} m^l (the joint mass factorises)

    R_cp^l = - mean_i m_i^{l⁻} m_i^l                   variant "product" (default)
    R_cp^l = - mean_i log(m_i^{l⁻} m_i^l)              variant "log"

s is the full distribution (softmax over the E logits, as Megatron's aux-loss scores), not the
renormalized top-k probabilities, whose top-k mass is always 1. For sigmoid and sqrtsoftplus
score functions s is the scores divided by their sum over the E experts (the normalization of
Megatron's ``compute_routing_scores_for_aux_loss``, done in log space:
``losses.routing_scores``; inferred). Gradients reach both layers' routers. All math is in fp32
(fp64 inputs stay fp64).
"""

from __future__ import annotations

import torch

from megatron_moe_reg.losses.specialization import at_least_fp32, masked_mean

VARIANTS = ("product", "log")
TINY = 1e-20


def topk_mass(scores_TE: torch.Tensor, topk: int, routing_map_TE: torch.Tensor | None = None) -> torch.Tensor:
    """m_i = Σ_{e ∈ TopK(i)} s_i^e; TopK from ``routing_map_TE`` when given (the experts actually
    routed to, e.g. with an expert bias), else the top-k of the scores."""
    s = at_least_fp32(scores_TE)
    if routing_map_TE is not None:
        return (s * routing_map_TE.to(torch.bool)).sum(dim=-1)
    return s.topk(topk, dim=-1).values.sum(dim=-1)


def coupling_from_masses(m_prev_T: torch.Tensor, m_T: torch.Tensor, variant: str = "product") -> torch.Tensor:
    """Per-token coupling term: -m⁻m ("product") or -log(m⁻m) ("log")."""
    if variant == "product":
        return -(m_prev_T * m_T)
    if variant == "log":
        return -(torch.log(m_prev_T.clamp_min(TINY)) + torch.log(m_T.clamp_min(TINY)))
    raise ValueError(f"unknown coupling variant {variant!r}; choose one of {VARIANTS}")


def coupling_loss(
    scores_prev_TE: torch.Tensor,
    scores_TE: torch.Tensor,
    topk: int,
    token_mask_T: torch.Tensor | None = None,
    variant: str = "product",
    *,
    routing_map_prev_TE: torch.Tensor | None = None,
    routing_map_TE: torch.Tensor | None = None,
) -> torch.Tensor:
    """R_cp between two consecutive MoE layers (Eq. 7, inferred form; see the module docstring).

    Args:
        scores_prev_TE, scores_TE: full routing distributions (rows sum to 1) of the previous
            and the current MoE layer for the same tokens, [T, E].
        topk: experts per token.
        token_mask_T: optional bool [T], True = keep.
        variant: "product" (default) or "log".
        routing_map_prev_TE, routing_map_TE: optional bool [T, E] of the experts actually routed
            to; default: the top-k of each layer's scores.
    Returns:
        fp32 scalar in [-1, 0] ("product"); 0 for a fully masked input.
    """
    if scores_prev_TE.shape != scores_TE.shape:
        raise ValueError(
            f"scores of the two layers differ in shape: {tuple(scores_prev_TE.shape)} vs {tuple(scores_TE.shape)}"
        )
    m_prev = topk_mass(scores_prev_TE, topk, routing_map_prev_TE)
    m = topk_mass(scores_TE, topk, routing_map_TE)
    return masked_mean(coupling_from_masses(m_prev, m, variant), token_mask_T)
