"""Reference grouped SwiGLU MLP: one matmul pair per expert, in plain torch.

For expert e with rows x_e (the tokens routed to it, consecutive in x):

    h_e = x_e W1_eᵀ,  W1_e = [W_gate; W_up]      (fc1 stacks gate and up, as Megatron's fc1)
    z_e = silu(gate) ⊙ up                          (SwiGLU; Megatron's MLP with gated_linear_unit)
    y_e = (p_e ⊙ z_e) W2_eᵀ                        (router probabilities scale z before fc2, as
                                                    Megatron's experts since megatron-core 0.13)

This is the ``sequential`` backend of ``grouped_mlp`` and the ground truth of the kernels' tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from megatron_moe_reg.experts.layout import Weights


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) ⊙ up for h = [gate, up] along the last dimension."""
    gate, up = torch.chunk(h, 2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(h: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """d/dh of z = silu(g) ⊙ u given dz, computed in fp32, returned in h's dtype:
    dg = dz ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),  du = dz ⊙ silu(g)."""
    gate, up = torch.chunk(h.float(), 2, dim=-1)
    sig = torch.sigmoid(gate)
    dz = dz.float()
    d_gate = dz * up * sig * (1 + gate * (1 - sig))
    d_up = dz * gate * sig
    return torch.cat([d_gate, d_up], dim=-1).to(h.dtype)


def scale_rows(z: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """p ⊙ z as Megatron computes it: the product in the probabilities' dtype, cast back to z's."""
    if probs is None:
        return z
    return (z * probs.unsqueeze(-1)).to(z.dtype)


def grouped_mlp_reference(
    x_NH: torch.Tensor, counts: Sequence[int], fc1: Weights, fc2: Weights, probs_N: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_NH, z_NF) with autograd through plain torch ops, one expert at a time."""
    outputs, activations = [], []
    for e, (x_e, p_e) in enumerate(
        zip(
            torch.split(x_NH, list(counts)),
            torch.split(probs_N, list(counts)) if probs_N is not None else [None] * len(counts),
            strict=False,
        )
    ):
        z_e = swiglu(x_e @ fc1[e].t())
        outputs.append(scale_rows(z_e, p_e) @ fc2[e].t())
        activations.append(z_e)
    return torch.cat(outputs), torch.cat(activations)


def probs_and_swiglu_backward(
    da: torch.Tensor,
    z: torch.Tensor,
    h: torch.Tensor,
    probs: torch.Tensor | None,
    dz_extra: torch.Tensor | None,
    need_dprobs: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """From da = ∂L/∂(p ⊙ z) to (∂L/∂p, ∂L/∂h): ∂p_r = Σ_f da_rf z_rf, ∂z = p ⊙ da + dz_extra
    (dz_extra: the gradient reaching z directly, e.g. from the specialization loss)."""
    dprobs = None
    if probs is None:
        dz = da
    else:
        if need_dprobs:
            dprobs = (da.float() * z.float()).sum(-1).to(probs.dtype)
        dz = (da.float() * probs.unsqueeze(-1)).to(da.dtype)
    if dz_extra is not None:
        dz = dz + dz_extra
    return dprobs, swiglu_backward(h, dz)
