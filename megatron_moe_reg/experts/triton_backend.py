"""The ``triton`` backend: grouped SwiGLU MLP on ``kernels.grouped_gemm``, forward and backward.

Forward: fc1 with the SwiGLU epilogue (stores h = [g, u] and z), then fc2 with the router
probability applied as a row scale in its epilogue, y = p ⊙ (z W2ᵀ) = (p ⊙ z) W2ᵀ (no bias), so
the only activation kept besides h is z itself, which is also handed to the specialization loss.
Backward: dgrad of fc2 (W2 read transposed in place), ∂p and the SwiGLU backward (torch
elementwise), wgrad of fc2 with p applied to z as it is loaded, wgrad and dgrad of fc1.
Saved for backward: x, h [rows, 2F], z [rows, F] — the same as Megatron's SequentialMLP.
"""

from __future__ import annotations

import torch

from megatron_moe_reg.experts.layout import pointer_table
from megatron_moe_reg.experts.reference import probs_and_swiglu_backward


def _uniform(weights: list[torch.Tensor], name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    first = weights[0]
    shape, strides = (first.shape[0], first.shape[1]), (first.stride(0), first.stride(1))
    if any(tuple(w.shape) != shape or w.stride() != strides for w in weights):
        raise ValueError(f"the experts' {name} weights differ in shape or layout")
    return shape, strides


class TritonGroupedSwiGLU(torch.autograd.Function):
    """(y, z) = grouped SwiGLU MLP of expert-sorted rows; weights: E fc1 then E fc2 tensors."""

    @staticmethod
    def forward(ctx, x, probs, offsets, num_experts: int, *weights):  # tensors; probs may be None
        from megatron_moe_reg.experts.kernels.grouped_gemm import rows_matmul

        fc1, fc2 = list(weights[:num_experts]), list(weights[num_experts:])
        if any(w.dtype != x.dtype for w in weights):
            raise TypeError(
                f"triton grouped GEMM: weights and activations must share a dtype, got {weights[0].dtype} and {x.dtype}"
            )
        x = x.contiguous()
        t1, t2 = pointer_table(fc1, x.device), pointer_table(fc2, x.device)
        shape1, strides1 = _uniform(fc1, "fc1")
        shape2, strides2 = _uniform(fc2, "fc2")
        z, h = rows_matmul(x, offsets, t1, shape1, strides1, swiglu=True)
        y, _ = rows_matmul(z, offsets, t2, shape2, strides2, row_scale=probs)
        ctx.save_for_backward(x, h, z, probs, offsets)
        ctx.tables, ctx.layouts = (t1, t2), (shape1, strides1, shape2, strides2)
        ctx.weight_dtype = weights[0].dtype
        return y, z

    @staticmethod
    def backward(ctx, dy: torch.Tensor, dz_extra: torch.Tensor | None):
        from megatron_moe_reg.experts.kernels.grouped_gemm import expert_wgrad, rows_matmul

        x, h, z, probs, offsets = ctx.saved_tensors
        t1, t2 = ctx.tables
        shape1, strides1, shape2, strides2 = ctx.layouts
        dy = dy.contiguous()
        # da = dy W2_e: W2_e [H, F] read as B [F, H] (transposed in place)
        da, _ = rows_matmul(dy, offsets, t2, (shape2[1], shape2[0]), (strides2[1], strides2[0]))
        dprobs, dh = probs_and_swiglu_backward(da, z, h, probs, dz_extra, ctx.needs_input_grad[1])
        d_fc2 = expert_wgrad(dy, z, offsets, out_dtype=ctx.weight_dtype, row_scale=probs)
        d_fc1 = expert_wgrad(dh, x, offsets, out_dtype=ctx.weight_dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dx, _ = rows_matmul(dh, offsets, t1, (shape1[1], shape1[0]), (strides1[1], strides1[0]))
        return (dx, dprobs, None, None, *d_fc1.unbind(0), *d_fc2.unbind(0))
