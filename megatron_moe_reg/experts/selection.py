"""``auto``: the fastest grouped-MLP backend for one shape, measured on this device.

Each candidate runs the expert block forward and backward on synthetic rows of the given shape
(an even split over the experts) after one warm-up call (Triton autotuning, allocator); the
backend with the smallest median time over ``repeats`` calls wins.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from megatron_moe_reg.config import ModelShape
from megatron_moe_reg.experts.functional import backend_unavailable_reason, grouped_mlp


@dataclass(frozen=True)
class ExpertShape:
    num_experts: int
    hidden: int
    ffn: int
    rows: int


def _inputs(shape: ExpertShape, device, dtype):
    g = torch.Generator().manual_seed(0)
    counts = [
        shape.rows // shape.num_experts + (1 if e < shape.rows % shape.num_experts else 0)
        for e in range(shape.num_experts)
    ]
    x = torch.randn(shape.rows, shape.hidden, generator=g).to(device, dtype).requires_grad_()
    fc1 = torch.randn(shape.num_experts, 2 * shape.ffn, shape.hidden, generator=g) * shape.hidden**-0.5
    fc2 = torch.randn(shape.num_experts, shape.hidden, shape.ffn, generator=g) * shape.ffn**-0.5
    probs = torch.rand(shape.rows, generator=g).to(device)
    return x, counts, fc1.to(device, dtype).requires_grad_(), fc2.to(device, dtype).requires_grad_(), probs


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock timings are complete."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_backends(candidates: list[str], shape: ExpertShape, device, dtype, repeats: int = 3) -> dict[str, float]:
    """Median seconds of forward+backward for each candidate that can run here."""
    x, counts, fc1, fc2, probs = _inputs(shape, device, dtype)
    times: dict[str, float] = {}
    for backend in candidates:
        if backend_unavailable_reason(backend, torch.device(device)) is not None:
            continue
        try:
            runs = []
            for i in range(repeats + 1):
                synchronize(device)
                start = time.perf_counter()
                grouped_mlp(x, counts, fc1, fc2, probs, backend=backend).float().sum().backward()
                synchronize(device)
                if i:  # the first call warms up
                    runs.append(time.perf_counter() - start)
        except (ValueError, TypeError, RuntimeError):  # e.g. alignment or dtype limits of torch._grouped_mm
            continue
        times[backend] = statistics.median(runs)
    return times


def fastest_backend(candidates: list[str], shape: ExpertShape, device, dtype) -> tuple[str, dict[str, float]]:
    """(the fastest of ``candidates`` here, the measured seconds); ``sequential`` if none ran."""
    times = time_backends(candidates, shape, device, dtype)
    return (min(times, key=lambda b: times[b]) if times else "sequential"), times


def choose_backend(backend: str, shape: ModelShape) -> tuple[str, str]:
    """(experts implementation, how it was chosen) for ``--moe-grouped-gemm-backend backend``.

    ``auto`` is measured on this device at the run's per-rank expert shape among triton, torch and
    sequential (torch and sequential on CPU) for bias-free SwiGLU experts, rank 0's choice shared
    by every rank (collective when a process group exists); sequential for other experts.
    Megatron's own ``--moe-grouped-gemm`` with the default backend is ``te``.
    """
    if not shape.num_experts:
        return "sequential", ""
    if backend == "sequential" and shape.moe_grouped_gemm:
        return "te", ""
    if backend != "auto":
        return backend, ""
    if not shape.swiglu or shape.add_bias_linear:
        return "sequential", "auto: the grouped backends need bias-free SwiGLU experts"
    if "moe_act" in shape.recompute_modules:
        return "sequential", "auto: --recompute-modules moe_act recomputes SequentialMLP's activation"
    return _measured_backend(shape)


def _measured_backend(shape: ModelShape) -> tuple[str, str]:
    import torch.distributed as dist

    assert shape.num_experts and shape.moe_ffn_hidden_size
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    candidates = ["triton", "torch", "sequential"] if on_gpu else ["torch", "sequential"]
    rows = shape.micro_batch_size * shape.seq_length // shape.context_parallel_size * shape.moe_router_topk
    expert_shape = ExpertShape(
        num_experts=shape.num_experts // shape.expert_model_parallel_size,
        hidden=shape.hidden_size,
        ffn=shape.moe_ffn_hidden_size // shape.expert_tensor_parallel_size,
        rows=rows,
    )
    choice: list[tuple[str, str] | None] = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        dtype = torch.bfloat16 if shape.bf16 else torch.float32
        best, times = fastest_backend(candidates, expert_shape, device, dtype)
        measured = ", ".join(f"{b} {1e3 * s:.1f} ms" for b, s in sorted(times.items(), key=lambda kv: kv[1]))
        choice = [(best, f"auto, measured fwd+bwd on rank 0: {measured}")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    assert choice[0] is not None
    return choice[0]
