"""Intra-layer specialization loss R_sp (arXiv 2602.14159, "Synergistic Intra- and Cross-Layer
Regularization Losses for MoE Expert Specialization", paper Eq. 4).

For an MoE layer and a token i routed to the set A_i of its top-k experts, let

    z_i^e = SiLU(x_i W_gate^e) ⊙ (x_i W_up^e)

be expert e's SwiGLU intermediate (the input of its down projection), taken *before* any
router-probability weighting. Then

    R_sp = mean_i  Σ_{e ≠ ν ∈ A_i}  cos²(z_i^e, z_i^ν)                       (paper Eq. 4)

over ordered pairs, as Eq. 4 writes them (each unordered pair counts twice), so a token's
term lies in [0, k(k-1)]. Source labels: the squared cosine over co-activated routed experts is
the paper's (Eq. 4, [S] in ../shared/reference/papers.md §1); the mean over tokens (the paper
does not say how tokens are aggregated) is inferred. A zero vector has cosine 0 with anything.
All math is in fp32 whatever the input dtype (fp64 inputs stay fp64).
"""

from __future__ import annotations

import torch

EPS = 1e-6


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 unchanged (float64 keeps gradchecks exact)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def normalized_gram(z_TKF: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """G_TKK[i, e, ν] = cos(z_i^e, z_i^ν) in fp32 (0 where either vector is zero)."""
    z = at_least_fp32(z_TKF)
    z_hat = z / z.norm(dim=-1, keepdim=True).clamp_min(eps)
    return z_hat @ z_hat.transpose(-1, -2)


def pairwise_cos2_from_gram(gram_TKK: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-token Σ_{e≠ν} cos² from an *unnormalized* Gram z zᵀ (e.g. summed over F-shards).

    cos²(z^e, z^ν) = G_eν² / (G_ee G_νν); ``G_ee`` are squared norms.
    """
    ratio, _, _ = cos2_terms(at_least_fp32(gram_TKK), eps)
    return ratio.sum(dim=(-1, -2))


def cos2_terms(gram_TKK: torch.Tensor, eps: float = EPS):
    """(G²_eν / (d_e d_ν) off the diagonal and 0 on it, 1/d, the off-diagonal mask) with
    d = max(G_ee, ε²): the cos² of every pair of a token under the ε-clamped norms."""
    off = 1.0 - torch.eye(gram_TKK.shape[-1], dtype=gram_TKK.dtype, device=gram_TKK.device)
    inv_d = 1.0 / gram_TKK.diagonal(dim1=-2, dim2=-1).clamp_min(eps * eps)  # [T, K]
    ratio = gram_TKK.pow(2) * off * inv_d.unsqueeze(-1) * inv_d.unsqueeze(-2)
    return ratio, inv_d, off


def specialization_per_token(z_TKF: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """r_i = Σ_{e≠ν} cos²(z_i^e, z_i^ν) for every token, shape [T] (fp32)."""
    gram = normalized_gram(z_TKF, eps)
    k = gram.shape[-1]
    off_diagonal = 1.0 - torch.eye(k, dtype=gram.dtype, device=gram.device)
    return (gram.pow(2) * off_diagonal).sum(dim=(-1, -2))


def masked_mean(values_T: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over kept tokens (``token_mask_T`` True = keep); 0, not NaN, when none is kept.

    A weighted sum, not a boolean selection: no host-device synchronization."""
    if token_mask_T is None:
        return values_T.mean() if values_T.numel() else values_T.sum() * 0.0
    keep = token_mask_T.to(device=values_T.device, dtype=values_T.dtype).reshape(-1)
    return (values_T * keep).sum() / keep.sum().clamp_min(1)


def specialization_loss(z_TKF: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """R_sp of one MoE layer (paper Eq. 4): mean over kept tokens of Σ_{e≠ν} cos²(z^e, z^ν).

    Args:
        z_TKF: the SwiGLU intermediates of each token's k routed experts, [T, k, F].
        token_mask_T: optional bool [T], True = keep (padding tokens False).
    Returns:
        fp32 scalar; 0 for k = 1, all-zero activations or a fully masked input.
    """
    if z_TKF.dim() != 3:
        raise ValueError(f"z_TKF must be [tokens, k, ffn], got shape {tuple(z_TKF.shape)}")
    return masked_mean(specialization_per_token(z_TKF), token_mask_T)
