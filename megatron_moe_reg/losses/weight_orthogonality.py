"""Expert weight-orthogonality loss (baseline of arXiv 2601.00457, "Geometric Regularization in
MoE: The Disconnect Between Weights and Activations"; formula inferred, papers.md §5).

For the flattened weights w_e = vec W_e of a layer's E experts (fc1 by default, [gate; up]
stacked as Megatron stores them; option fc2):

    L_orth = mean_{i≠j} cos²(w_i, w_j) = (Σ_ij G_ij² / (G_ii G_jj) - E) / (E (E - 1)),   G = w wᵀ

The paper gives no formula; a public nanoMoE ablation of it normalizes each flattened expert,
forms the cosine Gram and penalizes its squared off-diagonal entries (papers.md §5), which is
this up to the averaging constant. The same number is the weight-space MSO metric.
"""

from __future__ import annotations

import torch

from megatron_moe_reg.losses.specialization import at_least_fp32

EPS = 1e-12


def weight_orthogonality_from_gram(gram_EE: torch.Tensor) -> torch.Tensor:
    """mean_{i≠j} G_ij² / (G_ii G_jj) from an unnormalized Gram (e.g. summed over weight shards)."""
    g = at_least_fp32(gram_EE)
    num = g.shape[0]
    if num < 2:
        return g.sum() * 0.0
    sq_norm = g.diagonal().clamp_min(EPS)
    cos2 = g.pow(2) / (sq_norm[:, None] * sq_norm[None, :])
    off_diagonal = 1.0 - torch.eye(num, dtype=cos2.dtype, device=cos2.device)
    return (cos2 * off_diagonal).sum() / (num * (num - 1))


def weight_orthogonality_loss(weights_ED: torch.Tensor) -> torch.Tensor:
    """L_orth of E experts' weights, given as [E, ...] (each expert flattened)."""
    w = at_least_fp32(weights_ED.reshape(weights_ED.shape[0], -1))
    return weight_orthogonality_from_gram(w @ w.t())
