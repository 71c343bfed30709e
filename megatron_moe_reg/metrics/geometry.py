"""Router geometry (no gradient): σ_max, stable rank, row orthogonality and conditioning, all
from one Gram.

With the row Gram G = W Wᵀ of the routing matrix W (E x H), in fp64, its eigenvalues
λ_1 ≥ … ≥ λ_E (= σ_i², exact) and r the largest rank W can have: min(E, H), or the router's
structural rank when that is lower (EMoE's E x H directions live in its ``--moe-eigen-rank``-dim
shared basis), so that κ and the entropy speak of the directions the router can have:

σ_max(W)                = sqrt(λ_1)                                       (exact: σ_max² = λ_max(W Wᵀ))
srank(W)                = ‖W‖_F² / σ_max² = tr(G) / λ_1                   (SR-MoE's quantity)
row orthogonality       = ‖Ŵ Ŵᵀ - I‖_F = ‖D⁻¹ G D⁻¹ - I‖_F,  D = diag(max(‖w_e‖, ε))
                                                                       (SimBal's Gram deviation,
                                                                       papers.md §6b; Frobenius
                                                                       form inferred)
condition number κ      = σ_max / σ_r = sqrt(λ_1 / λ_r)                   (inf when σ_r = 0)
SVD entropy             = -Σ_{i≤r} p_i log p_i / log r,  p_i = λ_i / Σ_j λ_j,  0 log 0 = 0
                                                                       (1 = all r directions equally
                                                                       strong; normalized Shannon
                                                                       entropy of σ², inferred)
mean row cosine         = mean over e ≠ f of (Ŵ Ŵᵀ)_ef                    (signed)

The last three are the router-conditioning figures used to compare router optimizers and
balancers (peers-2026-12 §3.1: κ, SVD entropy, mean pairwise router-row cosine); the exact
normalizations there are not stated, so these are labelled inferred.

An E x E symmetric eigenproblem instead of an SVD of E x H, and one product shared by all.
A W with a non-finite entry gives nan for each (the eigensolver would raise), without a host read.
"""

from __future__ import annotations

import math

import torch

from megatron_moe_reg.losses.router_penalties import EPS


@torch.no_grad()
def geometry_tensors(W_EH: torch.Tensor, rank: int | None = None) -> dict[str, torch.Tensor]:
    """``router_sigma_max``, ``router_stable_rank``, ``router_row_orthogonality_error``,
    ``router_condition_number``, ``router_svd_entropy``, ``router_row_cosine_mean`` as fp64 0-d
    tensors on W's device (no host-device synchronization); ``rank``: W's structural rank, when
    below min(E, H)."""
    w = W_EH.detach().double()
    rows = w.shape[0]
    rank = min(*w.shape, rank or rows)
    finite = torch.isfinite(w).all()
    w = torch.where(finite, w, torch.zeros_like(w))
    gram = w @ w.t()
    spectrum = torch.linalg.eigvalsh(gram).flip(0)[:rank].clamp_min(0.0)  # λ_1 ≥ … ≥ λ_r
    lam = spectrum[0]
    norms = gram.diagonal().clamp_min(0.0).sqrt().clamp_min(EPS)
    cosines = gram / norms[:, None] / norms[None, :]
    eye = torch.eye(rows, dtype=gram.dtype, device=gram.device)
    nan = torch.full_like(lam, float("nan"))
    values = {
        "router_sigma_max": lam.sqrt(),
        "router_stable_rank": gram.trace() / lam.clamp_min(EPS),
        "router_row_orthogonality_error": torch.linalg.matrix_norm(cosines - eye),
        "router_condition_number": (lam / spectrum[-1]).sqrt(),
        "router_svd_entropy": svd_entropy(spectrum),
        "router_row_cosine_mean": (cosines.sum() - cosines.diagonal().sum()) / max(rows * (rows - 1), 1),
    }
    return {name: torch.where(finite, value, nan) for name, value in values.items()}


def svd_entropy(spectrum: torch.Tensor) -> torch.Tensor:
    """-Σ p log p / log r of p = λ / Σλ over the r values of ``spectrum`` (1 for r = 1; nan for a zero
    matrix)."""
    total = spectrum.sum()
    p = spectrum / total
    entropy = 0.0 - torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum()
    normalized = entropy / math.log(spectrum.numel()) if spectrum.numel() > 1 else torch.ones_like(entropy)
    return torch.where(total > 0, normalized, torch.full_like(normalized, float("nan")))


@torch.no_grad()
def spectral_norm(W: torch.Tensor) -> torch.Tensor:
    """σ_max(W), or nan when W is not finite."""
    return geometry_tensors(W)["router_sigma_max"]


@torch.no_grad()
def router_geometry(W_EH: torch.Tensor, rank: int | None = None) -> dict[str, float]:
    return {name: float(value) for name, value in geometry_tensors(W_EH, rank).items()}


@torch.no_grad()
def row_orthogonality_error(W_EH: torch.Tensor) -> torch.Tensor:
    """‖Ŵ Ŵᵀ - I‖_F of the row-normalized routing matrix."""
    return geometry_tensors(W_EH)["router_row_orthogonality_error"]
