"""Grouped-GEMM experts: forward+backward speed of each backend, side by side in one run.

For each shape, tokens are routed top-k to E experts (a mildly skewed router, so expert sizes
differ), and the expert block y = grouped_mlp(x, tokens_per_expert, W1, W2, probs) runs forward
and backward (gradients of x, probs, W1, W2) with every available backend, alternating, several
rounds. Reported per backend: median time, TFLOP/s (3 x the forward's 2·rows·3·F·H), the fraction
of a dense matmul of the same FLOPs measured in the same run, the speed-up over ``sequential``
(one matmul pair per expert, what Megatron's SequentialMLP does) and, on CUDA, peak memory.

Backends: ``sequential``, ``torch`` (torch._grouped_mm), ``triton`` (CUDA only: on CPU it would
run in Triton's interpreter) and ``te`` (TransformerEngine GroupedLinear for fc1/fc2 with the
SwiGLU and probability scaling in torch, when TE is installed).

Shapes: on CUDA (bf16) the issue's coarse shape E=8, H=4096, F=14336, 16k tokens, k=2 and fine
shapes E=64 / 128, H=2048, F=1408 / 768, k=8; on CPU (fp32) small shapes of the same two kinds.

    python benchmarks/grouped_gemm_speed.py [--rounds 5] [--shapes coarse fine64 fine128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from megatron_moe_reg.experts.selection import synchronize

GPU_SHAPES = {  # name: (experts, hidden, ffn, tokens, topk)
    "coarse": (8, 4096, 14336, 16384, 2),
    "fine64": (64, 2048, 1408, 16384, 8),
    "fine128": (128, 2048, 768, 16384, 8),
}
CPU_SHAPES = {
    "coarse": (8, 256, 896, 1024, 2),
    "fine64": (64, 128, 96, 1024, 8),
    "fine128": (128, 128, 48, 1024, 8),
}


def routed_inputs(shape, device, dtype, seed=0):
    experts, hidden, ffn, tokens, k = shape
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(tokens, experts, generator=g) + torch.linspace(0.5, 0, experts)
    chosen = scores.topk(k, dim=1).indices.flatten()
    counts = torch.bincount(chosen, minlength=experts)
    rows = int(counts.sum())
    x = (torch.randn(rows, hidden, generator=g)).to(device, dtype).requires_grad_()
    probs = torch.rand(rows, generator=g).to(device).requires_grad_()
    fc1 = [(torch.randn(2 * ffn, hidden, generator=g) / hidden ** 0.5).to(device, dtype).requires_grad_()
           for _ in range(experts)]
    fc2 = [(torch.randn(hidden, ffn, generator=g) / ffn ** 0.5).to(device, dtype).requires_grad_()
           for _ in range(experts)]
    return x, counts, fc1, fc2, probs


def _te_step() -> Callable | None:
    """fc1/fc2 as TransformerEngine GroupedLinear, SwiGLU and probabilities in torch (None without TE)."""
    try:
        import transformer_engine.pytorch as te
    except ImportError:
        return None
    from megatron_moe_reg.experts.reference import scale_rows, swiglu

    modules = {}

    def step(x, counts, fc1, fc2, probs):
        key = (len(fc1), x.shape[1], fc2[0].shape[1])
        if key not in modules:
            e, h, f = key
            lin1 = te.GroupedLinear(e, h, 2 * f, bias=False, params_dtype=x.dtype, device=x.device)
            lin2 = te.GroupedLinear(e, f, h, bias=False, params_dtype=x.dtype, device=x.device)
            with torch.no_grad():
                for i in range(e):
                    getattr(lin1, f"weight{i}").copy_(fc1[i])
                    getattr(lin2, f"weight{i}").copy_(fc2[i])
            modules[key] = (lin1, lin2)
        lin1, lin2 = modules[key]
        splits = counts.tolist()
        return lin2(scale_rows(swiglu(lin1(x, splits)), probs), splits)

    return step


def backends(device) -> dict[str, Callable]:
    from megatron_moe_reg.experts import backend_unavailable_reason, grouped_mlp

    out = {}
    for name in ("sequential", "torch", "triton"):
        if name == "triton" and device.type != "cuda":
            continue
        if backend_unavailable_reason(name, device) is None:
            out[name] = (lambda b: lambda x, c, w1, w2, p: grouped_mlp(x, c, w1, w2, p, backend=b))(name)
    te_step = _te_step() if device.type == "cuda" else None
    if te_step is not None:
        out["te"] = te_step
    return out


def dense_seconds(rows, hidden, ffn, device, dtype, rounds) -> float:
    """A dense matmul pair with the same FLOPs as the expert block (fwd+bwd), for the fraction."""
    a = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w1 = torch.randn(2 * ffn, hidden, device=device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(hidden, ffn, device=device, dtype=dtype, requires_grad=True)

    def run():
        h = a @ w1.t()
        y = h[:, :ffn] @ w2.t()
        y.backward(torch.ones_like(y))

    run()
    times = []
    for _ in range(rounds):
        synchronize(device)
        t0 = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shape(name, shape, device, dtype, rounds) -> list[dict]:
    x, counts, fc1, fc2, probs = routed_inputs(shape, device, dtype)
    experts, hidden, ffn, _, _ = shape
    rows = x.shape[0]
    flops = 3 * 2 * rows * 3 * ffn * hidden
    steps = backends(device)
    times = {b: [] for b in steps}
    peak = {}
    for fn in steps.values():  # warm-up (autotuning, compilation)
        fn(x, counts, fc1, fc2, probs).float().sum().backward()
    for _ in range(rounds):
        for b, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            t0 = time.perf_counter()
            fn(x, counts, fc1, fc2, probs).float().sum().backward()
            synchronize(device)
            times[b].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[b] = torch.cuda.max_memory_allocated() / 2 ** 30
    dense = dense_seconds(rows, hidden, ffn, device, dtype, rounds)
    seq = statistics.median(times["sequential"])
    rows_out = []
    for b, ts in times.items():
        t = statistics.median(ts)
        rows_out.append({"shape": name, "E": experts, "H": hidden, "F": ffn, "rows": rows, "backend": b,
                         "ms": 1e3 * t, "tflops": flops / t / 1e12, "dense_fraction": dense / t,
                         "speedup_vs_sequential": seq / t, "peak_gib": peak.get(b)})
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", nargs="*", default=list(GPU_SHAPES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# grouped GEMM experts, {dtype}, {where}, torch {torch.__version__}")
    print("| shape | E | H | F | rows | backend | ms | TFLOP/s | of dense | vs sequential | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.shapes:
        for r in bench_shape(name, shapes[name], device, dtype, args.rounds):
            results.append(r)
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            print(f"| {r['shape']} | {r['E']} | {r['H']} | {r['F']} | {r['rows']} | {r['backend']} | "
                  f"{r['ms']:.2f} | {r['tflops']:.3f} | {r['dense_fraction']:.2f} | "
                  f"×{r['speedup_vs_sequential']:.2f} | {peak} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "dtype": str(dtype), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
