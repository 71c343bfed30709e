"""Router geometry (no gradient): σ_max, stable rank, row orthogonality, all from one Gram.

With the row Gram G = W Wᵀ of the routing matrix W (E x H), in fp64:

σ_max(W)                = sqrt(λ_max(G))                                 (exact: σ_max² = λ_max(W Wᵀ))
srank(W)                = ‖W‖_F² / σ_max² = tr(G) / λ_max(G)              (SR-MoE's quantity)
row orthogonality       = ‖Ŵ Ŵᵀ - I‖_F = ‖D⁻¹ G D⁻¹ - I‖_F,  D = diag(max(‖w_e‖, ε))
                                                                       (SimBal's Gram deviation,
                                                                       papers.md §6b; Frobenius
                                                                       form inferred)

An E x E symmetric eigenproblem instead of an SVD of E x H, and one product shared by the three.
A W with a non-finite entry gives nan for each (the eigensolver would raise), without a host read.
"""

from __future__ import annotations

import torch

from megatron_moe_reg.losses.router_penalties import EPS


@torch.no_grad()
def geometry_tensors(W_EH: torch.Tensor) -> dict[str, torch.Tensor]:
    """``router_sigma_max``, ``router_stable_rank``, ``router_row_orthogonality_error`` as fp64
    0-d tensors on W's device (no host-device synchronization)."""
    w = W_EH.detach().double()
    finite = torch.isfinite(w).all()
    w = torch.where(finite, w, torch.zeros_like(w))
    gram = w @ w.t()
    lam = torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0)
    norms = gram.diagonal().clamp_min(0.0).sqrt().clamp_min(EPS)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    nan = torch.full_like(lam, float("nan"))
    values = {
        "router_sigma_max": lam.sqrt(),
        "router_stable_rank": gram.trace() / lam.clamp_min(EPS),
        "router_row_orthogonality_error": torch.linalg.matrix_norm(gram / norms[:, None] / norms[None, :] - eye),
    }
    return {name: torch.where(finite, value, nan) for name, value in values.items()}


@torch.no_grad()
def spectral_norm(W: torch.Tensor) -> torch.Tensor:
    """σ_max(W), or nan when W is not finite."""
    return geometry_tensors(W)["router_sigma_max"]


@torch.no_grad()
def router_geometry(W_EH: torch.Tensor) -> dict[str, float]:
    return {name: float(value) for name, value in geometry_tensors(W_EH).items()}


@torch.no_grad()
def row_orthogonality_error(W_EH: torch.Tensor) -> torch.Tensor:
    """‖Ŵ Ŵᵀ - I‖_F of the row-normalized routing matrix."""
    return geometry_tensors(W_EH)["router_row_orthogonality_error"]
