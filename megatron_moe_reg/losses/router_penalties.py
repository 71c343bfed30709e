"""Spectral-norm and stable-rank router penalties (SR-MoE, arXiv 2601.03889; forms inferred).

SR-MoE applies "a dual-objective spectral penalty" to the routing weights: a spectral-norm term
that bounds the router's Lipschitz constant and a stable-rank term that "preserves
high-dimensional feature diversity in expert selection" (abstract / summaries,
../shared/reference/papers.md §2). The paper's formulas could not be read; these are inferred:

    σ_max(W)          largest singular value of the routing matrix W (E x H), by power iteration
    srank(W)        = ‖W‖_F² / σ_max(W)²          (stable rank, in [1, rank W])
    P_spectral      = σ_max²                      or, with a target c, relu(σ_max - c)²  (hinge)
    P_stable_rank   = 1 / srank(W) = σ_max² / ‖W‖_F²

Power iteration (as ``torch.nn.utils.spectral_norm``): v = normalize(Wᵀu), u = normalize(W v),
σ = uᵀ W v with u, v treated as constants, so ∂σ/∂W = u vᵀ. All math in fp32 (fp64 kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_moe_reg.losses.specialization import at_least_fp32

EPS = 1e-12


def power_iteration(W: torch.Tensor, u: torch.Tensor, n_iter: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_iter`` steps from ``u`` (left vector, length E); returns the new (u, v), no gradient."""
    with torch.no_grad():
        w = at_least_fp32(W)
        u = u.to(w)
        for _ in range(max(n_iter, 1)):
            v = F.normalize(w.t() @ u, dim=0, eps=EPS)
            u = F.normalize(w @ v, dim=0, eps=EPS)
    return u, v


def sigma_from_vectors(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """σ = uᵀ W v, differentiable in W (u, v are constants)."""
    w = at_least_fp32(W)
    return torch.dot(u.to(w), w @ v.to(w))


def spectral_norm(W: torch.Tensor, u: torch.Tensor | None = None, n_iter: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_max(W) by ``n_iter`` power-iteration steps from ``u`` (a fixed seed when None).

    Returns (sigma, u): sigma differentiable in W, u the updated left vector to reuse.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be a matrix, got shape {tuple(W.shape)}")
    if u is None:
        u = torch.randn(W.shape[0], generator=torch.Generator().manual_seed(0)).to(W.device)
    u, v = power_iteration(W, u, n_iter)
    return sigma_from_vectors(W, u, v), u


def stable_rank(W: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """srank(W) = ‖W‖_F² / σ_max²; σ_max exact (SVD) unless given."""
    w = at_least_fp32(W)
    if sigma is None:
        sigma = torch.linalg.matrix_norm(w, ord=2)
    return w.pow(2).sum() / sigma.pow(2).clamp_min(EPS)


def spectral_penalty(sigma: torch.Tensor, target: float | None = None) -> torch.Tensor:
    """σ² (default) or the hinge relu(σ - c)² when a target c is given."""
    if target is None:
        return sigma.pow(2)
    return F.relu(sigma - target).pow(2)


def stable_rank_penalty(W: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """1 / srank(W): lower when the routing features spread over more directions."""
    return 1.0 / stable_rank(W, sigma).clamp_min(EPS)
