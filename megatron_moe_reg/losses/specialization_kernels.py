"""Fused Triton kernels for R_sp's per-token Gram (imported only when the triton path runs).

For each token t with rows Z_t [S, F] (``losses.specialization_rows``), read where the experts left
them: Z_t[s] is row ``source[t * S + s]`` of the rows R [N, F] (any float dtype), or a zero row
where ``source`` is -1 (an empty slot). Nothing is placed or converted first.

- ``gram_terms``: one pass over Z_t computes G_t = Z_t Z_tᵀ (fp32 accumulation), d = max(diag G, ε²),
  the token's Σ_{e≠ν} G_eν² / (d_e d_ν) and ∂/∂G (off the diagonal 2 G_eν / (d_e d_ν); on it
  -2 Σ_ν G_eν² / (d_e² d_ν), 0 where the clamp is active), times the token's weight w_t.
- ``gram_backward``: ∂R/∂Z_t = 2 c (∂/∂G_t) Z_t, c the incoming gradient (a device scalar), written
  straight into the gradient of the rows (each row fills at most one slot; rows in no slot get 0).

One program per token; S padded to a power of two (≥ 2), F walked in blocks. Under
``TRITON_INTERPRET=1`` the kernels run on CPU (the test suite checks them against the torch path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gram_terms_kernel(x_ptr, src_ptr, w_ptr, r_ptr, dg_ptr, S, F, eps2, SP: tl.constexpr, BF: tl.constexpr):
    t = tl.program_id(0)
    rows = tl.arange(0, SP)
    src = tl.load(src_ptr + t * S + rows, mask=rows < S, other=-1)  # int64: row of each slot, -1 empty
    present = src >= 0
    src = tl.where(present, src, 0)
    gram = tl.zeros((SP, SP), dtype=tl.float32)
    for f0 in range(0, F, BF):
        cols = f0 + tl.arange(0, BF)
        mask = present[:, None] & (cols[None, :] < F)
        z = tl.load(x_ptr + src[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gram += tl.sum(z[:, None, :] * z[None, :, :], axis=2)
    eye = rows[:, None] == rows[None, :]
    diag = tl.sum(tl.where(eye, gram, 0.0), axis=1)  # [SP]
    active = diag > eps2
    inv_d = 1.0 / tl.maximum(diag, eps2)
    valid = (rows[:, None] < S) & (rows[None, :] < S) & (~eye)
    ratio = tl.where(valid, gram * gram * inv_d[:, None] * inv_d[None, :], 0.0)
    w = tl.load(w_ptr + t)
    tl.store(r_ptr + t, tl.sum(tl.sum(ratio, axis=1), axis=0))
    d_off = tl.where(valid, 2.0 * gram * inv_d[:, None] * inv_d[None, :], 0.0)
    d_diag = tl.where(active, -2.0 * tl.sum(ratio, axis=1) * inv_d, 0.0)
    d_gram = (d_off + tl.where(eye, d_diag[:, None], 0.0)) * w
    out = (rows[:, None] < S) & (rows[None, :] < S)
    tl.store(dg_ptr + t * S * S + rows[:, None] * S + rows[None, :], d_gram, mask=out)


@triton.jit
def _gram_backward_kernel(x_ptr, src_ptr, dg_ptr, c_ptr, dx_ptr, S, F, SP: tl.constexpr, BF: tl.constexpr):
    t = tl.program_id(0)
    rows = tl.arange(0, SP)
    src = tl.load(src_ptr + t * S + rows, mask=rows < S, other=-1)
    present = src >= 0
    src = tl.where(present, src, 0)
    square = (rows[:, None] < S) & (rows[None, :] < S)
    d_gram = tl.load(dg_ptr + t * S * S + rows[:, None] * S + rows[None, :], mask=square, other=0.0)
    scale = 2.0 * tl.load(c_ptr)
    for f0 in range(0, F, BF):
        cols = f0 + tl.arange(0, BF)
        mask = present[:, None] & (cols[None, :] < F)
        z = tl.load(x_ptr + src[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dz = tl.sum(d_gram[:, :, None] * z[None, :, :], axis=1) * scale  # [SP, BF]
        tl.store(dx_ptr + src[:, None] * F + cols[None, :], dz, mask=mask)


def _launch_shape(slots: int, width: int) -> tuple[int, int]:
    sp = max(2, triton.next_power_of_2(slots))
    return sp, min(triton.next_power_of_2(width), max(16, 1024 // sp))


def gram_terms(
    rows: torch.Tensor, source: torch.Tensor, weights: torch.Tensor, slots: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token Σ_{e≠ν} cos² [T], w-weighted ∂/∂G [T, S, S]) of the rows [N, F] at ``source``
    [T * S] (fp32 results)."""
    rows = rows.contiguous()
    num_tokens, width = weights.shape[0], rows.shape[-1]
    r = torch.empty(num_tokens, dtype=torch.float32, device=rows.device)
    d_gram = torch.empty(num_tokens, slots, slots, dtype=torch.float32, device=rows.device)
    if num_tokens:
        sp, bf = _launch_shape(slots, width)
        w = weights.to(device=rows.device, dtype=torch.float32).contiguous()
        _gram_terms_kernel[(num_tokens,)](rows, source, w, r, d_gram, slots, width, eps * eps, SP=sp, BF=bf)
    return r, d_gram


def gram_backward(
    rows: torch.Tensor, source: torch.Tensor, d_gram: torch.Tensor, grad: torch.Tensor, complete: bool
) -> torch.Tensor:
    """∂/∂rows [N, F] fp32: 2 · grad · (∂/∂G_t) Z_t of every token, at each slot's row (``complete``:
    every row fills a slot, so no zero fill)."""
    rows = rows.contiguous()
    num_tokens, slots = d_gram.shape[0], d_gram.shape[1]
    fill = torch.empty if complete else torch.zeros
    d_rows = fill(rows.shape, dtype=torch.float32, device=rows.device)
    if num_tokens:
        sp, bf = _launch_shape(slots, rows.shape[-1])
        c = grad.to(device=rows.device, dtype=torch.float32).reshape(1).contiguous()
        _gram_backward_kernel[(num_tokens,)](
            rows, source, d_gram.contiguous(), c, d_rows, slots, rows.shape[-1], SP=sp, BF=bf
        )
    return d_rows
