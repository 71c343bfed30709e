"""Router geometry (no gradient): σ_max, stable rank, row orthogonality.

σ_max(W)                exact largest singular value of the routing matrix W (E x H)
srank(W)              = ‖W‖_F² / σ_max²                                 (SR-MoE's quantity)
row orthogonality     = ‖Ŵ Ŵᵀ - I‖_F,  Ŵ = W with unit-norm rows      (SimBal's Gram deviation,
                                                                       papers.md §6b; Frobenius
                                                                       form inferred)

A W with a non-finite entry gives nan for each (the SVD behind σ_max would raise), without a host read.
"""

from __future__ import annotations

import torch

from megatron_moe_reg.losses.router_penalties import EPS, stable_rank


@torch.no_grad()
def spectral_norm(W: torch.Tensor) -> torch.Tensor:
    """σ_max(W), or nan when W is not finite."""
    finite = torch.isfinite(W).all()
    sigma = torch.linalg.matrix_norm(torch.where(finite, W, torch.zeros_like(W)), ord=2)
    return torch.where(finite, sigma, torch.full_like(sigma, float("nan")))


@torch.no_grad()
def router_geometry(W_EH: torch.Tensor) -> dict[str, float]:
    w = W_EH.detach().double()
    sigma = spectral_norm(w)
    return {
        "router_sigma_max": float(sigma),
        "router_stable_rank": float(stable_rank(w, sigma.clamp_min(EPS))),
        "router_row_orthogonality_error": float(row_orthogonality_error(w)),
    }


@torch.no_grad()
def row_orthogonality_error(W_EH: torch.Tensor) -> torch.Tensor:
    """‖Ŵ Ŵᵀ - I‖_F of the row-normalized routing matrix."""
    w = W_EH.detach().double()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(EPS)
    return torch.linalg.matrix_norm(w @ w.t() - torch.eye(w.shape[0], dtype=w.dtype, device=w.device))
