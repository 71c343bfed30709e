"""``grouped_mlp``: all local experts' SwiGLU MLPs over expert-sorted rows, one call.

    y = grouped_mlp(x_NH, tokens_per_expert_E, fc1_weight_E2FH, fc2_weight_EHF, probs_N, backend)

Rows of x are sorted by expert (expert e owns ``tokens_per_expert[e]`` consecutive rows), fc1
stacks [gate; up] as Megatron's fc1 does, and probs (if given) scale the SwiGLU output before fc2
(the formula is in ``reference``). Weights are a [E, out, in] tensor or a sequence of E [out, in]
tensors (Megatron's per-expert parameters; the triton backend reads them in place).

Backends: ``triton`` (our kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``torch``
(``torch._grouped_mm``), ``sequential`` (one matmul pair per expert) and ``auto`` (the first
available of triton, torch, sequential on CUDA; sequential on CPU). ``te`` is Megatron's
``TEGroupedMLP`` module and exists only as ``--moe-grouped-gemm-backend te``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from megatron_moe_reg.config import GROUPED_GEMM_BACKENDS
from megatron_moe_reg.experts.layout import Weights, as_list, expert_offsets
from megatron_moe_reg.experts.reference import grouped_mlp_reference

BACKENDS = GROUPED_GEMM_BACKENDS
FUNCTIONAL_BACKENDS = ("triton", "torch", "sequential")


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    device = torch.device(device)
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU, slow)"
        return None
    if backend == "torch":
        if not hasattr(torch, "_grouped_mm"):
            return f"this torch ({torch.__version__}) has no torch._grouped_mm"
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
            return "torch._grouped_mm needs a compute capability 9.0+ GPU (H100 and newer)"
        return None
    if backend == "sequential":
        return None
    if backend == "te":
        return "the te backend is Megatron's TEGroupedMLP module (--moe-grouped-gemm-backend te)"
    return f"unknown backend {backend!r}; choose one of {BACKENDS}"


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` → the first available of triton, torch, sequential (CUDA) or sequential (CPU).
    An explicit backend that cannot run raises ValueError with the reason."""
    if backend == "auto":
        if torch.device(device).type != "cuda":
            return "sequential"
        return next(b for b in FUNCTIONAL_BACKENDS if backend_unavailable_reason(b, device) is None)
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"grouped GEMM backend {backend!r} unavailable: {reason}")
    return backend


def grouped_mlp_with_activation(
    x_NH: torch.Tensor,
    tokens_per_expert: torch.Tensor | Sequence[int],
    fc1: Weights,
    fc2: Weights,
    probs_N: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_NH, z_NF): the output and the SwiGLU activation z before probability scaling.

    z is the tensor the backend keeps for its own backward (no extra copy); gradients reaching
    z (e.g. from the specialization loss) flow into fc1 and x.
    """
    backend = resolve_backend(backend, x_NH.device)
    fc1_list, fc2_list = as_list(fc1), as_list(fc2)
    if len(fc1_list) != len(fc2_list):
        raise ValueError(f"{len(fc1_list)} fc1 weights but {len(fc2_list)} fc2 weights")
    if backend == "sequential":
        counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else tokens_per_expert
        return grouped_mlp_reference(x_NH, counts, fc1_list, fc2_list, probs_N)
    function: type[torch.autograd.Function]
    if backend == "triton":
        from megatron_moe_reg.experts.triton_backend import TritonGroupedSwiGLU

        function = TritonGroupedSwiGLU
    else:
        from megatron_moe_reg.experts.torch_backend import TorchGroupedSwiGLU

        function = TorchGroupedSwiGLU
    return function.apply(
        x_NH, probs_N, expert_offsets(tokens_per_expert, x_NH.device), len(fc1_list), *fc1_list, *fc2_list
    )


def grouped_mlp(
    x_NH: torch.Tensor,
    tokens_per_expert_E: torch.Tensor | Sequence[int],
    fc1_weight_E2FH: Weights,
    fc2_weight_EHF: Weights,
    probs_N: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """out_NH of the grouped SwiGLU MLP (see the module docstring)."""
    return grouped_mlp_with_activation(x_NH, tokens_per_expert_E, fc1_weight_E2FH, fc2_weight_EHF, probs_N, backend)[0]
