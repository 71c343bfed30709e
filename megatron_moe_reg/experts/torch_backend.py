"""The ``torch`` backend: grouped SwiGLU MLP on ``torch._grouped_mm`` (forward and backward).

``torch._grouped_mm`` runs on CUDA (sm90+, bf16) and on CPU; its own autograd is not available
on every build (on CPU its backward fails), so the backward is written out here with grouped
GEMMs too: dgrad ``_grouped_mm(dY, W)`` and wgrad ``_grouped_mm(dYᵀ, X)`` grouped along the rows.
Weights are used as one [E, out, in] tensor (``layout.stacked``: a view when the experts' weights
are evenly spaced in one storage, else a copy).
"""

from __future__ import annotations

import torch

from megatron_moe_reg.experts.layout import stacked
from megatron_moe_reg.experts.reference import probs_and_swiglu_backward, scale_rows, swiglu


def check_alignment(hidden: int, ffn: int, dtype: torch.dtype, device_type: str = "cpu") -> None:
    """``torch._grouped_mm`` needs rows whose byte size is a multiple of 16, and bf16 on CUDA."""
    if device_type == "cuda" and dtype != torch.bfloat16:
        raise ValueError(
            f"torch._grouped_mm on CUDA needs bf16, got {dtype}; train with --bf16 or use the "
            "triton or sequential backend"
        )
    size = torch.empty((), dtype=dtype).element_size()
    for name, n in (("hidden size", hidden), ("expert ffn hidden size", ffn)):
        if (n * size) % 16:
            raise ValueError(
                f"the torch grouped GEMM backend needs the {name} ({n}) to be a multiple "
                f"of {16 // size} in {dtype}; use the triton or sequential backend"
            )


class TorchGroupedSwiGLU(torch.autograd.Function):
    """(y, z) = grouped SwiGLU MLP of expert-sorted rows; weights: E fc1 then E fc2 tensors."""

    @staticmethod
    def forward(ctx, x, probs, offsets, num_experts: int, *weights):  # tensors; probs may be None
        check_alignment(x.shape[1], weights[-1].shape[1], x.dtype, x.device.type)
        fc1 = stacked(list(weights[:num_experts]))
        fc2 = stacked(list(weights[num_experts:]))
        ends = offsets[1:]
        h = torch._grouped_mm(x, fc1.transpose(-2, -1), offs=ends)
        z = swiglu(h)
        y = torch._grouped_mm(scale_rows(z, probs), fc2.transpose(-2, -1), offs=ends)
        ctx.save_for_backward(x, h, z, probs, ends, fc1, fc2)
        return y, z

    @staticmethod
    def backward(ctx, dy: torch.Tensor, dz_extra: torch.Tensor | None):
        x, h, z, probs, ends, fc1, fc2 = ctx.saved_tensors
        dy = dy.contiguous()
        da = torch._grouped_mm(dy, fc2, offs=ends)
        dprobs, dh = probs_and_swiglu_backward(da, z, h, probs, dz_extra, ctx.needs_input_grad[1])
        d_fc2 = torch._grouped_mm(dy.t(), scale_rows(z, probs), offs=ends)
        d_fc1 = torch._grouped_mm(dh.t(), x, offs=ends)
        dx = torch._grouped_mm(dh, fc1, offs=ends) if ctx.needs_input_grad[0] else None
        return (dx, dprobs, None, None, *d_fc1.unbind(0), *d_fc2.unbind(0))
