"""R_sp's per-token Gram alone: the torch path (placement + batched matmuls) against the fused Triton
kernels (rows read in place through each slot's row index), forward+backward and no-grad.

Rows come as one chunk in Megatron's permuted order, as grouped-GEMM experts hand them over. The
kernels alternate within each round; a figure is the median over rounds, with the achieved
bandwidth of reading the rows once forward and once backward plus writing their gradient
(3 x N x F x bytes per element: the traffic a fused implementation cannot avoid). On CPU only the
torch path runs (Triton's interpreter is a correctness tool, not a speed one).

    python benchmarks/gram_kernel_speed.py [--shapes fine coarse] [--rounds 10] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# name: (tokens, experts, k, F)
SHAPES = {
    "fine": (16384, 64, 8, 1408),
    "coarse": (16384, 8, 2, 14336),
    "tiny": (1024, 8, 2, 256),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def inputs(shape: str, dtype, device, seed: int = 0):
    from megatron_moe_reg.losses.specialization_rows import mean_weights, permuted_pairs, slot_of

    tokens, experts, k, width = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(tokens, experts, device=device, generator=g)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool, device=device)
    routing_map.scatter_(1, logits.topk(k).indices, True)
    token, expert = permuted_pairs(routing_map, tokens * k)
    positions = token * k + slot_of(routing_map, token, expert)
    weights = mean_weights(torch.ones(tokens, dtype=torch.bool, device=device))
    rows = torch.randn(tokens * k, width, device=device, generator=g).to(dtype)
    return rows, positions, weights, k


def timed(kernel: str, rows, positions, weights, k, grad: bool) -> float:
    from megatron_moe_reg.losses.specialization_rows import specialization_loss_from_rows

    x = rows.detach().requires_grad_(grad)
    _sync()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad):
        loss = specialization_loss_from_rows([x], positions, weights, k, complete=True, kernel=kernel)
        if grad:
            loss.backward()
    _sync()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None,
                   help="default: fine coarse on GPU, tiny on CPU")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    argv = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shapes = argv.shapes or (["fine", "coarse"] if cuda else ["tiny"])
    dtype = DTYPES[argv.dtype or ("bf16" if cuda else "fp32")]
    kernels = ["torch", "triton"] if cuda else ["torch"]
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}, {dtype}, {argv.rounds} rounds (median), one chunk of rows")
    print("| shape | T | k | F | kernel | fwd+bwd ms | GB/s (3 N F passes) | no-grad ms |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        rows, positions, weights, k = inputs(shape, dtype, device)
        traffic = 3 * rows.numel() * rows.element_size()
        times: dict[tuple[str, bool], list[float]] = {(kn, g): [] for kn in kernels for g in (True, False)}
        for i in range(argv.rounds + 1):
            for key in times:
                t = timed(key[0], rows, positions, weights, k, key[1])
                if i:  # the first round warms up (Triton compiles)
                    times[key].append(t)
        tokens, _, _, width = SHAPES[shape]
        for kn in kernels:
            both, alone = statistics.median(times[(kn, True)]), statistics.median(times[(kn, False)])
            print(f"| {shape} | {tokens} | {k} | {width} | {kn} | {1e3 * both:.3f} | {traffic / both / 1e9:.0f} "
                  f"| {1e3 * alone:.3f} |")


if __name__ == "__main__":
    main()
