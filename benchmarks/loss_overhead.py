"""Step time and peak memory of training steps with R_sp / R_cp / L_orth on versus off.

One model, one process; the variants alternate step by step on the same data stream (so the
ratios are measured side by side), each a full training step (forward, backward, optimizer):

  off        every coefficient 0, no measurement (expert load is still counted)
  measure    coefficients 0, losses and routing metrics measured without gradient (what a
             log-interval step costs)
  R_sp       λ_sp = 2e-3
  R_cp       λ_cp = 1e-3
  R_sp+R_cp  both
  L_orth     weight-orthogonality loss on fc1, λ = 1e-2

Memory per variant: the bytes autograd keeps for backward during a step (unique storages,
counted with ``torch.autograd.graph.saved_tensors_hooks``; CPU and GPU) and, on GPU, the
allocator's peak, each measured in a fresh subprocess.

    python benchmarks/loss_overhead.py [--config examples/tiny_cpu.toml] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = {"off": (0.0, 0.0, 0.0, False), "measure": (0.0, 0.0, 0.0, True), "R_sp": (2e-3, 0.0, 0.0, False),
            "R_cp": (0.0, 1e-3, 0.0, False), "R_sp+R_cp": (2e-3, 1e-3, 0.0, False),
            "L_orth": (0.0, 0.0, 1e-2, False)}


def setup(argv):
    from megatron_moe_reg.errors import quiet_third_party_warnings
    from megatron_moe_reg.training import trainer
    from megatron_moe_reg.training.arguments import parse_args

    quiet_third_party_warnings()
    cfg = parse_args(["--config", argv.config, "--mock-data", "--vocab-size", str(argv.vocab_size),
                      "--micro-batch-size", str(argv.micro_batch_size), "--global-batch-size",
                      str(argv.micro_batch_size), "--train-iters", "1000", "--eval-iters", "0",
                      "--moe-specialization-loss-coeff", "1e-3", "--moe-coupling-loss-coeff", "1e-3",
                      "--moe-weight-orthogonality-coeff", "1e-3"],
                     world_size=1)
    return cfg, trainer.setup(cfg)


def run_step(ctx, data, variant: str) -> float:
    from megatron_moe_reg.integration.regularizers import StepPlan
    from megatron_moe_reg.training.step import train_step

    sp, cp, orth, measure = VARIANTS[variant]
    regs = ctx.regularizers
    regs.set_coefficients({"moe_specialization_loss_coeff": sp, "moe_coupling_loss_coeff": cp,
                           "moe_weight_orthogonality_coeff": orth})
    regs.begin_step(1, StepPlan(measure=measure))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_step(ctx, data)
    regs.finish_step(1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/tiny_cpu.toml")
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--memory-probe", choices=list(VARIANTS), help=argparse.SUPPRESS)
    argv = p.parse_args()
    from megatron_moe_reg.training.data import make_loader

    cfg, ctx = setup(argv)
    data = iter(make_loader(ctx.datasets[0], cfg))
    if argv.memory_probe:
        run_step(ctx, data, argv.memory_probe)  # warm-up (optimizer state allocated)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        storages: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run_step(ctx, data, argv.memory_probe)
        saved = sum(storages.values()) / 2**20
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        print(json.dumps({"saved_mb": saved, "peak_mb": peak}))
        return
    times = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    for i in range(argv.steps + 1):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate to spread drift evenly
        for v in order:
            t = run_step(ctx, data, v)
            if i > 0:  # the first round warms up
                times[v].append(t)
    memory = {}
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--config", argv.config, "--vocab-size",
                              str(argv.vocab_size), "--micro-batch-size", str(argv.micro_batch_size),
                              "--memory-probe", v], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"memory probe {v} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        memory[v] = json.loads(out.stdout.strip().splitlines()[-1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    print(f"device: {device}, threads: {torch.get_num_threads()}, config: {argv.config}, {tokens} tokens/step, "
          f"{argv.steps} timed steps per variant (median)")
    base_t = statistics.median(times["off"])
    for v in VARIANTS:
        t = statistics.median(times[v])
        saved, base_saved = memory[v]["saved_mb"], memory["off"]["saved_mb"]
        line = (f"  {v:<10} {1000 * t:8.1f} ms/step  x{t / base_t:.3f}   saved for backward "
                f"{saved:8.1f} MiB  x{saved / base_saved:.4f}")
        if memory[v]["peak_mb"] is not None:
            line += f"   peak {memory[v]['peak_mb']:.1f} MiB x{memory[v]['peak_mb'] / memory['off']['peak_mb']:.4f}"
        print(line)


if __name__ == "__main__":
    main()
