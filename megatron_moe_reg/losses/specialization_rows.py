"""R_sp from rows where the experts left them: a Gram autograd function that keeps no new T x k x F tensor.

The experts produce one row z_j (width F) per routed (token, expert) pair, in the dispatcher's
order. ``positions[j] = i * S + s`` names the token i and slot s (0 <= s < S) of row j; the value
``T * S`` drops a row (a token outside a subsample). With the per-token Gram G_i = Z_i Z_iᵀ
(S x S) of the rows placed at token i and d_e = max(G_ee, ε²) (the ε-clamped squared norms),

    R_sp = Σ_i w_i Σ_{e≠ν} G_i[e, ν]² / (d_e d_ν)  = Σ_i w_i Σ_{e≠ν} cos²(z_i^e, z_i^ν)
                                                             (paper Eq. 4, arXiv 2602.14159)

with w_i = keep_i / Σ keep (the mean over kept tokens; ``losses.specialization``). An empty slot
(a dropped token's missing expert) is a zero row: cosine 0 with anything.

Backward (inferred, by the chain rule): ∂R/∂G_i = 2 w_i G_i ⊙ (1 - I); ∂R/∂Ẑ_i = 2 (∂R/∂G_i) Ẑ_i
(∂R/∂G is symmetric, so both factors of G contribute); through the normalization
∂R/∂z = (∂R/∂ẑ - ẑ (ẑ · ∂R/∂ẑ)) / ‖z‖ where ‖z‖ > ε, and ∂R/∂ẑ / ε elsewhere.

Saved for backward: the rows themselves (tensors the experts already keep for their own backward,
so no new storage), each row's slot and each slot's row (one integer per row and per slot) and
∂R/∂G (S x S per token); Z is gathered again in backward. Math in fp32 (fp64 inputs stay fp64). No
host-device synchronization. Without gradient (a log-step measurement with the coefficient 0) the
value is computed alone and nothing is kept. The Triton path reads the rows where they are, through
each slot's row index, and writes their gradient in place: no placed copy of Z in either direction.
"""

from __future__ import annotations

import torch

from megatron_moe_reg.losses.specialization import EPS, cos2_terms


def _compute_dtype(rows) -> torch.dtype:
    return torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32


def slot_sources(positions: torch.Tensor, num_slots: int, empty: int = -1) -> torch.Tensor:
    """``source[p]``: the row placed at slot p (``positions[row] = p``), ``empty`` where none is; rows
    at ``num_slots`` (dropped) fill no slot. int64 [num_slots]."""
    source = torch.full((num_slots + 1,), empty, dtype=torch.int64, device=positions.device)
    source.scatter_(0, positions, torch.arange(positions.numel(), device=positions.device))
    return source[:num_slots]


def use_triton(kernel: str, rows) -> bool:
    """Whether the fused Triton kernels compute the Gram ("auto": on CUDA with fp16/bf16/fp32 rows)."""
    if kernel == "triton":
        return True
    if kernel == "torch" or not rows[0].is_cuda or _compute_dtype(rows) == torch.float64:
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _joined(rows, zero_row: bool = False) -> torch.Tensor:
    """The chunks as one [N, F] tensor (no copy for one chunk), in a common dtype; ``zero_row``
    appends a zero row (index N)."""
    parts = [*rows, rows[0].new_zeros(1, rows[0].shape[-1])] if zero_row else list(rows)
    if len(parts) == 1:
        return parts[0]
    dtype = rows[0].dtype if all(r.dtype == rows[0].dtype for r in rows) else _compute_dtype(rows)
    return torch.cat([r.to(dtype) for r in parts])


def _torch_sources(positions, num_tokens: int, slots: int, rows) -> torch.Tensor:
    """Each slot's row for ``_token_rows``: N (the appended zero row) where a slot is empty."""
    return slot_sources(positions, num_tokens * slots, empty=sum(r.shape[0] for r in rows))


def _token_rows(source, num_tokens: int, slots: int, complete: bool, rows, dtype=None) -> torch.Tensor:
    """Z [T, S, F] in the compute dtype (or ``dtype``): each slot's row gathered (one index_select;
    a scatter into a zero-filled buffer is several times slower on CPU), zeros in empty slots."""
    z = _joined(rows, zero_row=not complete).index_select(0, source)
    return z.to(dtype or _compute_dtype(rows)).view(num_tokens, slots, -1)


def _triton_terms(positions, weights, slots, eps, rows):
    """(per-token terms, w-weighted ∂R/∂G, slot sources) from the fused kernels."""
    from megatron_moe_reg.losses.specialization_kernels import gram_terms

    source = slot_sources(positions, weights.shape[0] * slots)
    per_token, d_gram = gram_terms(_joined(rows), source, weights, slots, eps)
    return per_token, d_gram, source


def _measured_value(positions, weights, slots, eps, complete, kernel, rows) -> torch.Tensor:
    """R_sp without gradient (a log-step measurement): the forward's value, nothing kept for backward."""
    if use_triton(kernel, rows):
        per_token, _, _ = _triton_terms(positions, weights, slots, eps, rows)
        return per_token @ weights.to(per_token.dtype)
    source = _torch_sources(positions, weights.shape[0], slots, rows)
    z = _token_rows(source, weights.shape[0], slots, complete, rows)
    ratio, _, _ = cos2_terms(z @ z.transpose(1, 2), eps)
    return ratio.sum(dim=(1, 2)) @ weights.to(z.dtype)


class RowSpecialization(torch.autograd.Function):
    """``apply(positions, weights_T, slots, eps, complete, kernel, *rows)`` -> R_sp (a scalar)."""

    @staticmethod
    def forward(ctx, positions, weights, slots, eps, complete, kernel, *rows):
        ctx.slots, ctx.complete, ctx.triton = slots, complete, use_triton(kernel, rows)
        if ctx.triton:  # one fused pass over each token's rows (losses.specialization_kernels)
            per_token, d_gram, source = _triton_terms(positions, weights, slots, eps, rows)
            ctx.save_for_backward(None, source, d_gram, *rows)  # the kernels need no row -> slot map
            return per_token @ weights.to(per_token.dtype)
        source = _torch_sources(positions, weights.shape[0], slots, rows)
        z = _token_rows(source, weights.shape[0], slots, complete, rows)
        dtype = z.dtype
        gram = z @ z.transpose(1, 2)
        ratio, inv_d, off = cos2_terms(gram, eps)
        # ∂/∂G_eν = 2 G_eν / (d_e d_ν) off the diagonal; ∂/∂d_e = -2 Σ_ν ratio_eν / d_e (both orders),
        # 0 where the clamp is active: an S x S matrix per token, kept for backward instead of Z
        d_gram = 2.0 * gram * off * inv_d.unsqueeze(2) * inv_d.unsqueeze(1)
        d_diag = -2.0 * ratio.sum(dim=2) * inv_d * (gram.diagonal(dim1=1, dim2=2) > eps * eps)
        d_gram = (d_gram + torch.diag_embed(d_diag)) * weights.to(dtype).view(-1, 1, 1)
        ctx.save_for_backward(positions, source, d_gram, *rows)
        return ratio.sum(dim=(1, 2)) @ weights.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        positions, source, d_gram, *rows = ctx.saved_tensors  # positions: None on the Triton path
        # ∂/∂Z = (∂G + ∂Gᵀ) Z = 2 ∂G Z (∂G is symmetric)
        if ctx.triton:
            from megatron_moe_reg.losses.specialization_kernels import gram_backward

            d_rows = gram_backward(_joined(rows), source, d_gram, grad, ctx.complete)
        else:
            num_tokens, slots = d_gram.shape[0], ctx.slots
            z = _token_rows(source, num_tokens, slots, ctx.complete, rows, d_gram.dtype)
            d_z = z.new_empty(num_tokens * slots + 1, z.shape[-1])
            d_z[-1] = 0.0  # the trash row's gradient
            torch.bmm(d_gram * (2.0 * grad.to(d_gram.dtype)), z, out=d_z[:-1].view(num_tokens, slots, -1))
            d_rows = d_z.index_select(0, positions)
        grads = d_rows.split([r.shape[0] for r in rows]) if len(rows) > 1 else (d_rows,)
        return (None, None, None, None, None, None, *(g.to(r.dtype) for g, r in zip(grads, rows, strict=True)))


def specialization_loss_from_rows(
    rows: list[torch.Tensor],
    positions: torch.Tensor,
    weights_T: torch.Tensor,
    slots: int,
    eps: float = EPS,
    complete: bool = False,
    kernel: str = "auto",
) -> torch.Tensor:
    """R_sp of rows placed at ``positions`` (token * slots + slot; ``T * slots`` drops a row).

    Args:
        rows: chunks [n_c, F] in the order of ``positions`` (any float dtype; differentiable).
        positions: long [Σ n_c], values in [0, T * slots].
        weights_T: per-token weights [T] (keep / number kept: a mean over kept tokens).
        slots: S, the slots per token (k, or k + 1 with a shared expert).
        complete: the positions cover every slot exactly once (skips a zero fill; wrong if not so).
        kernel: "torch" (batched matmuls), "triton" (``losses.specialization_kernels``) or "auto".
    """
    if not rows:
        raise ValueError("specialization_loss_from_rows needs at least one chunk of rows")
    if not (torch.is_grad_enabled() and any(r.requires_grad for r in rows)):
        return _measured_value(positions, weights_T, slots, eps, complete, kernel, rows)
    return RowSpecialization.apply(positions, weights_T, slots, eps, complete, kernel, *rows)


def mean_weights(keep_T: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_i = keep_i / max(Σ keep, 1) (a mean over kept tokens; 0 everywhere when none is kept)."""
    keep = keep_T.reshape(-1).to(dtype)
    return keep / keep.sum().clamp_min(1)


def permuted_pairs(routing_map_TE: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, expert) of each row in Megatron's permuted order: expert-major, tokens ascending (the
    order of ``permute(tokens, routing_map)``), for the first ``num_rows`` selected pairs. Computed by
    a cumulative sum and a scatter, not a boolean selection: no host-device synchronization."""
    num_tokens, num_experts = routing_map_TE.shape
    flat = routing_map_TE.t().reshape(-1)
    rank = torch.cumsum(flat.to(torch.int64), 0) - 1
    dest = torch.where(flat, rank, torch.full_like(rank, num_rows)).clamp(max=num_rows)
    order = torch.zeros(num_rows + 1, dtype=torch.int64, device=flat.device)
    order.scatter_(0, dest, torch.arange(flat.numel(), device=flat.device))
    order = order[:num_rows]
    return order % num_tokens, order // num_tokens


def slot_of(routing_map_TE: torch.Tensor, token: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """The slot of (token, expert): the expert's rank among the token's routed experts (ascending)."""
    slots = torch.cumsum(routing_map_TE.to(torch.int64), dim=1) - 1
    return slots[token, expert]
