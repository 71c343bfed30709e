"""Overlap between experts: co-activation overlap, PES, and weight/activation MSO (no gradient).

    co-activation overlap  O_co  = R_sp / (k(k-1))        mean cos² over ordered pairs of a token's
                                                          routed experts' SwiGLU intermediates (the
                                                          R_sp quantity, arXiv 2602.14159 Eq. 4)
    PES                    = mean_t 2/(N(N-1)) Σ_{i<j} cos(f_i(x_t), f_j(x_t))      (SimBal Eq. 5-6)
                             all N experts evaluated on the same sampled tokens
    weight MSO             = 2/(E(E-1)) Σ_{i<j} cos²(vec W_i, vec W_j)   (arXiv 2601.00457; inferred form)
    activation MSO         = mean_t 2/(N(N-1)) Σ_{i<j} cos²(f_i(x_t), f_j(x_t))       (same; inferred)

PES averages signed cosines (as SimBal writes it); MSO averages squared cosines.
"""

from __future__ import annotations

import torch

from megatron_moe_reg.losses.specialization import specialization_per_token

EPS = 1e-12


def _pairwise_cosines(vectors_NTD: torch.Tensor) -> torch.Tensor:
    """cos between every pair of the N vectors, per token: [T, N, N]."""
    v = vectors_NTD.double().transpose(0, 1)  # [T, N, D]
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return v @ v.transpose(-1, -2)


def _upper_mean(matrix_TNN: torch.Tensor) -> torch.Tensor:
    n = matrix_TNN.shape[-1]
    i, j = torch.triu_indices(n, n, offset=1, device=matrix_TNN.device)
    return matrix_TNN[..., i, j].mean(dim=-1)


@torch.no_grad()
def coactivation_overlap(z_TKF: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cos² between co-activated experts' SwiGLU intermediates (R_sp / (k(k-1)))."""
    k = z_TKF.shape[1]
    if k < 2:
        return torch.zeros((), dtype=torch.float64, device=z_TKF.device)
    r = specialization_per_token(z_TKF).double() / (k * (k - 1))
    if token_mask_T is not None:
        r = r[token_mask_T.reshape(-1).to(torch.bool)]
    return r.mean() if r.numel() else r.sum()


@torch.no_grad()
def pairwise_expert_similarity(outputs_NTH: torch.Tensor) -> torch.Tensor:
    """SimBal's PES: mean over tokens and expert pairs of cos(f_i(x), f_j(x)); outputs [N, T, H]."""
    if outputs_NTH.shape[0] < 2:
        raise ValueError("PES needs at least two experts")
    return _upper_mean(_pairwise_cosines(outputs_NTH)).mean()


@torch.no_grad()
def activation_mso(outputs_NTH: torch.Tensor) -> torch.Tensor:
    """Activation-space MSO: mean over tokens and expert pairs of cos²(f_i(x), f_j(x))."""
    if outputs_NTH.shape[0] < 2:
        raise ValueError("MSO needs at least two experts")
    return _upper_mean(_pairwise_cosines(outputs_NTH).pow(2)).mean()


@torch.no_grad()
def weight_mso(weights_E: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Weight-space MSO: mean over expert pairs of cos²(vec W_i, vec W_j)."""
    flat = (
        torch.stack([w.reshape(-1) for w in weights_E])
        if isinstance(weights_E, (list, tuple))
        else weights_E.reshape(weights_E.shape[0], -1)
    )
    if flat.shape[0] < 2:
        raise ValueError("MSO needs at least two experts")
    return _upper_mean(_pairwise_cosines(flat[:, None, :]).pow(2)).mean()
