"""Triton grouped GEMMs over expert-sorted rows (imported only when the triton backend runs).

Two kernels serve the forward and backward of the grouped SwiGLU MLP:

- ``rows_matmul``: C[r, :] = A[r, :] B_eᵀ for every row r of expert e, B_e [N, K] read through a
  table of per-expert addresses (so Megatron's separate per-expert weights need no stacking copy)
  with arbitrary strides (so dgrad reads B_e transposed in place). Epilogues:
  ``swiglu`` — B_e holds [gate; up] (2N rows); stores h = [g, u] and z = silu(g) ⊙ u;
  ``row_scale`` — multiplies row r by s[r] (the router probability).
  Programs walk row tiles of BLOCK_M rows that never cross an expert boundary; the grid is the
  upper bound ⌈rows/BLOCK_M⌉ + E tiles, and each program finds its expert from the row offsets
  on the device, so nothing waits for the host.
- ``expert_wgrad``: dW_e = A_eᵀ (s_e ⊙ B_e) summed over expert e's rows (an empty expert gets 0).

Accumulation is fp32; fp32 inputs multiply in IEEE fp32 (no TF32), so they match torch's fp32.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU (used by the test suite).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter's tl.dot multiplies bf16 operands as their raw 16-bit patterns, so under it the
# operands are widened to fp32 first: the same products (a bf16 product is exact in fp32) and fp32
# accumulation, only summed in another order than on a GPU.
_WIDEN_DOT = tl.constexpr(INTERPRETED)


def _configs(big: list[tuple]) -> list:
    if INTERPRETED:  # one tile shape; the interpreter runs each program in Python, so few and large
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in big
    ]


_ROWS_CONFIGS = _configs(
    [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)]
)
_SWIGLU_CONFIGS = _configs([(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)])
_WGRAD_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)])


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a b with fp32 accumulation; IEEE: fp32 operands multiplied without TF32."""
    if IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif _WIDEN_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _row_tile(pid, row_offsets, num_experts, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, its first tile, its first row, its row end) of row tile ``pid``; the expert is
    num_experts when ``pid`` is past the last tile. Tiles never cross an expert boundary."""
    idx = tl.arange(0, E_POW2)
    mask = idx < num_experts
    starts = tl.load(row_offsets + idx, mask=mask, other=0)
    ends = tl.load(row_offsets + idx + 1, mask=mask, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, axis=0)
    e = tl.sum((tile_ends <= pid).to(tl.int32), axis=0)
    pick = idx == e
    first_tile = tl.sum(tl.where(pick, tile_ends - tiles, 0), axis=0)
    return e, first_tile, tl.sum(tl.where(pick, starts, 0), axis=0), tl.sum(tl.where(pick, ends, 0), axis=0)


def expert_slots(num_experts: int) -> int:
    """The compile-time length of the row-offset vector a row tile searches for its expert: 256 up
    to 256 experts, then the next power of two. One length for every usual expert count, so that a
    model's expert count selects no compilation of its own (each costs seconds per tile shape)."""
    return max(256, triton.next_power_of_2(num_experts))


@triton.jit(do_not_specialize=["num_experts"])  # the expert count selects no compilation either
def _rows_matmul_kernel(
    a_ptr,
    b_table,
    c_ptr,
    h_ptr,
    scale_ptr,
    row_offsets,
    num_experts,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_hm,
    up_offset,
    SWIGLU: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    IEEE: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, first_tile, row_start, row_end = _row_tile(pid_m, row_offsets, num_experts, BLOCK_M, E_POW2)
    if e >= num_experts:
        return
    first_row = row_start + (pid_m - first_tile) * BLOCK_M
    rows = (first_row + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < row_end
    col_mask = cols < N
    b_ptr = tl.load(b_table + e).to(tl.pointer_type(a_ptr.dtype.element_ty))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b_offs = ks[:, None] * stride_bk + cols[None, :] * stride_bn
        b_mask = k_mask[:, None] & col_mask[None, :]
        b = tl.load(b_ptr + b_offs, mask=b_mask, other=0.0)
        acc = _dot(a, b, acc, IEEE)
        if SWIGLU:
            b_up = tl.load(b_ptr + up_offset + b_offs, mask=b_mask, other=0.0)
            acc_up = _dot(a, b_up, acc_up, IEEE)
    out_mask = row_mask[:, None] & col_mask[None, :]
    c_offs = rows[:, None] * stride_cm + cols[None, :]
    if SWIGLU:
        h_offs = rows[:, None] * stride_hm + cols[None, :]
        gate = acc.to(h_ptr.dtype.element_ty)
        up = acc_up.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + h_offs, gate, mask=out_mask)
        tl.store(h_ptr + h_offs + N, up, mask=out_mask)
        g = gate.to(tl.float32)  # z from the stored (rounded) h, as an unfused SwiGLU would
        acc = g * tl.sigmoid(g) * up.to(tl.float32)
    if ROW_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _wgrad_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    c_ptr,
    row_offsets,
    M,
    N,
    stride_am,
    stride_ak,
    stride_bm,
    stride_bk,
    stride_ce,
    stride_cm,
    ROW_SCALE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    pid = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    ms = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    start = tl.load(row_offsets + e)
    end = tl.load(row_offsets + e + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rs = (r0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        r_mask = rs < end
        a_t = tl.load(
            a_ptr + rs[None, :] * stride_am + ms[:, None] * stride_ak, mask=m_mask[:, None] & r_mask[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + rs[:, None] * stride_bm + ns[None, :] * stride_bk, mask=r_mask[:, None] & n_mask[None, :], other=0.0
        )
        if ROW_SCALE:
            s = tl.load(scale_ptr + rs, mask=r_mask, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * s[:, None]).to(a_t.dtype)
        acc = _dot(a_t, b, acc, IEEE)
    c_offs = e.to(tl.int64) * stride_ce + ms[:, None] * stride_cm + ns[None, :]
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_rows_plain = triton.autotune(_ROWS_CONFIGS, key=["N", "K", "ROW_SCALE", "IEEE"])(_rows_matmul_kernel)
_rows_swiglu = triton.autotune(_SWIGLU_CONFIGS, key=["N", "K", "IEEE"])(_rows_matmul_kernel)
_wgrad = triton.autotune(_WGRAD_CONFIGS, key=["M", "N", "ROW_SCALE", "IEEE"])(_wgrad_kernel)


def rows_matmul(
    a: torch.Tensor,
    offsets: torch.Tensor,
    b_table: torch.Tensor,
    b_shape: tuple[int, int],
    b_strides: tuple[int, int],
    *,
    swiglu: bool = False,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """C = A B_eᵀ per expert's rows; B_e [N, K] with strides ``b_strides`` at ``b_table[e]``.

    ``swiglu``: B_e is [2N', K] = [gate; up]; returns (z [rows, N'], h [rows, 2N']).
    Otherwise returns (C [rows, N], None), rows scaled by ``row_scale`` when given.
    """
    rows, k = a.shape
    n = b_shape[0] // 2 if swiglu else b_shape[0]
    assert b_shape[1] == k, (b_shape, a.shape)
    num_experts = offsets.numel() - 1
    c = torch.empty(rows, n, dtype=a.dtype, device=a.device)
    h = torch.empty(rows, 2 * n, dtype=a.dtype, device=a.device) if swiglu else None
    if rows == 0 or n == 0:
        return c, h
    kernel = _rows_swiglu if swiglu else _rows_plain

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) + num_experts, triton.cdiv(n, meta["BLOCK_N"]))

    kernel[grid](
        a,
        b_table,
        c,
        h if swiglu else c,
        row_scale if row_scale is not None else c,
        offsets,
        num_experts,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b_strides[0],
        b_strides[1],
        c.stride(0),
        h.stride(0) if h is not None else 0,
        n * b_strides[0] if swiglu else 0,
        SWIGLU=swiglu,
        ROW_SCALE=row_scale is not None,
        IEEE=a.dtype == torch.float32,
        E_POW2=expert_slots(num_experts),
    )
    return c, h


def expert_wgrad(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """dW [E, M, N] with dW_e = A_eᵀ (s_e ⊙ B_e) over expert e's rows (A [rows, M], B [rows, N])."""
    m, n = a.shape[1], b.shape[1]
    num_experts = offsets.numel() - 1
    out = torch.empty(num_experts, m, n, dtype=out_dtype, device=a.device)
    if num_experts == 0 or m == 0 or n == 0:
        return out

    def grid(meta):
        return (num_experts, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]))

    _wgrad[grid](
        a,
        b,
        row_scale if row_scale is not None else a,
        out,
        offsets,
        m,
        n,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        ROW_SCALE=row_scale is not None,
        IEEE=a.dtype == torch.float32,
    )
    return out
