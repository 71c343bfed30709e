"""Grouped-GEMM experts: all local experts' SwiGLU MLPs in one call (triton, torch, sequential)."""

from megatron_moe_reg.experts.functional import (
    BACKENDS,
    backend_unavailable_reason,
    grouped_mlp,
    grouped_mlp_with_activation,
    resolve_backend,
)

__all__ = ["BACKENDS", "backend_unavailable_reason", "grouped_mlp", "grouped_mlp_with_activation", "resolve_backend"]
