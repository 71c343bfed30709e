"""R_sp from rows where the experts left them: a Gram autograd function that keeps no new T x k x F tensor.

The experts produce one row z_j (width F) per routed (token, expert) pair, in the dispatcher's
order. ``positions[j] = i * S + s`` names the token i and slot s (0 <= s < S) of row j; the value
``T * S`` drops a row (a token outside a subsample). With ẑ = z / max(‖z‖, ε) and the per-token
Gram G_i = Ẑ_i Ẑ_iᵀ (S x S) of the rows placed at token i,

    R_sp = Σ_i w_i Σ_{e≠ν} G_i[e, ν]²                      (paper Eq. 4, arXiv 2602.14159)

with w_i = keep_i / Σ keep (the mean over kept tokens; ``losses.specialization``). An empty slot
(a dropped token's missing expert) is a zero row: cosine 0 with anything.

Backward (inferred, by the chain rule): ∂R/∂G_i = 2 w_i G_i ⊙ (1 - I); ∂R/∂Ẑ_i = 2 (∂R/∂G_i) Ẑ_i
(∂R/∂G is symmetric, so both factors of G contribute); through the normalization
∂R/∂z = (∂R/∂ẑ - ẑ (ẑ · ∂R/∂ẑ)) / ‖z‖ where ‖z‖ > ε, and ∂R/∂ẑ / ε elsewhere.

Saved for backward: the rows themselves (tensors the experts already keep for their own backward,
so no new storage), the positions (one integer per row) and w; Ẑ and G are recomputed. Math in
fp32 (fp64 inputs stay fp64). No host-device synchronization.
"""

from __future__ import annotations

import torch

from megatron_moe_reg.losses.specialization import EPS


def _compute_dtype(rows: tuple[torch.Tensor, ...]) -> torch.dtype:
    return torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32


def _assemble(rows, positions, num_slots: int, width: int, dtype, eps: float):
    """(ẑ [num_slots, width], norms [num_slots]) with row j at ``positions[j]`` (the trash row dropped)."""
    device = positions.device
    z = torch.zeros(num_slots + 1, width, dtype=dtype, device=device)
    start = 0
    for chunk in rows:
        n = chunk.shape[0]
        if n:
            z.index_copy_(0, positions[start : start + n], chunk.to(dtype))
        start += n
    z = z[:num_slots]
    norms = z.norm(dim=-1)
    return z / norms.clamp_min(eps).unsqueeze(-1), norms


class RowSpecialization(torch.autograd.Function):
    """``apply(positions, weights_T, slots, eps, *rows)`` -> R_sp (a scalar)."""

    @staticmethod
    def forward(ctx, positions, weights, slots, eps, *rows):
        num_tokens = weights.shape[0]
        width = rows[0].shape[-1]
        dtype = _compute_dtype(rows)
        z_hat, _ = _assemble(rows, positions, num_tokens * slots, width, dtype, eps)
        z_hat = z_hat.view(num_tokens, slots, width)
        gram = z_hat @ z_hat.transpose(1, 2)
        off = 1.0 - torch.eye(slots, dtype=dtype, device=gram.device)
        per_token = (gram.pow(2) * off).sum(dim=(1, 2))
        ctx.save_for_backward(positions, weights, *rows)
        ctx.slots, ctx.eps = slots, eps
        return (per_token * weights.to(dtype)).sum()

    @staticmethod
    def backward(ctx, grad):
        positions, weights, *rows = ctx.saved_tensors
        slots, eps = ctx.slots, ctx.eps
        num_tokens, width = weights.shape[0], rows[0].shape[-1]
        dtype = _compute_dtype(tuple(rows))
        z_hat, norms = _assemble(rows, positions, num_tokens * slots, width, dtype, eps)
        z3 = z_hat.view(num_tokens, slots, width)
        gram = z3 @ z3.transpose(1, 2)
        off = 1.0 - torch.eye(slots, dtype=dtype, device=gram.device)
        d_gram = 2.0 * gram * off * (grad.to(dtype) * weights.to(dtype)).view(-1, 1, 1)
        d_hat = (2.0 * d_gram @ z3).view(-1, width)
        radial = (z_hat * d_hat).sum(-1, keepdim=True)
        big = (norms > eps).unsqueeze(-1)
        d_z = torch.where(big, (d_hat - z_hat * radial) / norms.clamp_min(eps).unsqueeze(-1), d_hat / eps)
        d_z = torch.cat([d_z, d_z.new_zeros(1, width)])  # the trash row's gradient is 0
        grads, start = [], 0
        for chunk in rows:
            n = chunk.shape[0]
            grads.append(d_z.index_select(0, positions[start : start + n]).to(chunk.dtype))
            start += n
        return (None, None, None, None, *grads)


def specialization_loss_from_rows(
    rows: list[torch.Tensor], positions: torch.Tensor, weights_T: torch.Tensor, slots: int, eps: float = EPS
) -> torch.Tensor:
    """R_sp of rows placed at ``positions`` (token * slots + slot; ``T * slots`` drops a row).

    Args:
        rows: chunks [n_c, F] in the order of ``positions`` (any float dtype; differentiable).
        positions: long [Σ n_c], values in [0, T * slots].
        weights_T: per-token weights [T] (keep / number kept: a mean over kept tokens).
        slots: S, the slots per token (k, or k + 1 with a shared expert).
    """
    if not rows:
        raise ValueError("specialization_loss_from_rows needs at least one chunk of rows")
    return RowSpecialization.apply(positions, weights_T, slots, eps, *rows)


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
