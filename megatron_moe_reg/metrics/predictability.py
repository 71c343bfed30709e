"""Router predictability between consecutive MoE layers (offline; no gradient).

Megatron-LM's ``tools/moe_routing/analyze_routing_predictability.py`` (0.19) applies MoE layer l's
router (its weights, expert bias and score function) to the router inputs of the previous MoE layer
l⁻ and compares the per-expert token counts it predicts with those layer l actually routed:

    ĉ_e = #{t : e ∈ top-k of router_l(x_t^{l⁻})},   c_e = #{t : e ∈ top-k of router_l(x_t^l)}
    load cosine   = ĉ·c / (‖ĉ‖ ‖c‖)
    load Spearman = Pearson correlation of the ranks of ĉ and c (ties: average ranks)

(the tool's definition as its description states it, peers-2026-12 §2.3; the formulas are written
out here, inferred). Per token, which the counts cannot show (ours, inferred):

    top-k overlap = mean_t |P̂_t ∩ A_t| / |A_t|,   P̂_t, A_t the predicted and actual expert sets

k/E for a router that ignores its input's layer, 1 when layer l would route the same experts from
layer l⁻'s inputs. Any router that has a ``gating`` and ``routing`` (Megatron's and the plugin's).
"""

from __future__ import annotations

import torch


def average_ranks(values_E: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties averaged: rank_i = #{j : x_j < x_i} + (#{j : x_j = x_i} + 1) / 2."""
    x = values_E.double().reshape(-1)
    less = (x.unsqueeze(0) < x.unsqueeze(1)).sum(1).double()
    equal = (x.unsqueeze(0) == x.unsqueeze(1)).sum(1).double()
    return less + (equal + 1) / 2


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    scale = float(a.norm() * b.norm())
    return float((a * b).sum()) / scale if scale > 0 else None


def load_agreement(predicted_E: torch.Tensor, actual_E: torch.Tensor) -> tuple[float | None, float | None]:
    """(cosine, Spearman ρ) of two per-expert token counts; each None where it is undefined (a zero
    vector; a constant one for ρ)."""
    p, a = predicted_E.double().reshape(-1), actual_E.double().reshape(-1)
    if p.shape != a.shape:
        raise ValueError(f"the two count vectors differ in length: {p.numel()} vs {a.numel()}")
    norms = float(p.norm() * a.norm())
    cosine = float(p @ a) / norms if norms > 0 else None
    return cosine, _pearson(average_ranks(p), average_ranks(a))


def topk_overlap(predicted_TE: torch.Tensor, actual_TE: torch.Tensor) -> float:
    """mean over tokens of |P̂_t ∩ A_t| / |A_t| for two boolean routing maps [T, E] (0 for no token)."""
    if predicted_TE.shape != actual_TE.shape:
        raise ValueError(f"the routing maps differ in shape: {tuple(predicted_TE.shape)} vs {tuple(actual_TE.shape)}")
    if actual_TE.shape[0] == 0:
        return 0.0
    shared = (predicted_TE.bool() & actual_TE.bool()).sum(1).double()
    routed = actual_TE.bool().sum(1).double().clamp_min(1)
    return float((shared / routed).mean())
