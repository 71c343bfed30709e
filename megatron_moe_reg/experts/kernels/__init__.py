"""Triton kernels of the grouped-GEMM experts (imported only when the triton backend runs)."""
