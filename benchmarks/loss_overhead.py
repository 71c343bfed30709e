"""Step time and activation memory of training steps with R_sp / R_cp / L_orth on versus off.

One model, one data stream. Each round runs every variant once, in a new random order, each as
a pair of full training steps (forward, backward, optimizer) beside an "off" step of its own (in
random order within the pair), so slow drift of a noisy machine cancels in the pair's ratio. A
variant's figure is the 20 % trimmed mean over rounds of those ratios, with a bootstrap 95 %
interval; "off (control)" is an "off" step paired with an "off" step, and its figure (ideally
1.000) says how far the others can be trusted. Python's garbage collector runs between steps,
never inside a timed one.

  off            every coefficient 0, no measurement (expert load is still counted)
  measure        coefficients 0, losses and routing metrics measured without gradient (a log step)
  R_sp           λ_sp = 2e-3
  R_cp           λ_cp = 1e-3
  R_sp+R_cp      both
  R_sp+R_cp@256  both, R_sp over 256 evenly spaced tokens per micro-batch (--moe-specialization-max-tokens)
  L_orth         weight-orthogonality loss on fc1, λ = 1e-2

Under the ratios, a breakdown of the plugin's time per step from the profiler (on a GPU, the time of
the kernels each range launched, beside its host time), for R_sp+R_cp steps and for measure-only
steps: return to the owners, Gram (forward and its backward node), attachment, coupling, routing
metrics (expert load, counted on every step, "off" included; on measured steps also the routing
entropy and the router geometry).

With ``--ep 2`` the benchmark runs itself in two processes (expert parallelism, ``--dispatcher``
alltoall or allgather) and also times the floor of R_sp's exact communication alone: per MoE
layer and micro-batch, forward and backward, an all-to-all of k x F values per token (alltoall) or
of the [group tokens x k x F] buffer (allgather: the bytes of a reduce-scatter of it).

Memory (one process): the bytes autograd keeps for backward during a step (unique storages, via
``torch.autograd.graph.saved_tensors_hooks``) and, on GPU, the allocator's peak, each measured in a
fresh subprocess.

    python benchmarks/loss_overhead.py [--config examples/tiny_cpu.toml] [--rounds 48] [--ep 2 --dispatcher alltoall]
        [-- more moe-reg pretrain flags]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

# (λ_sp, λ_cp, λ_orth, measure, R_sp max tokens)
VARIANTS = {
    "off": (0.0, 0.0, 0.0, False, 0),
    "off (control)": (0.0, 0.0, 0.0, False, 0),
    "measure": (0.0, 0.0, 0.0, True, 0),
    "R_sp": (2e-3, 0.0, 0.0, False, 0),
    "R_cp": (0.0, 1e-3, 0.0, False, 0),
    "R_sp+R_cp": (2e-3, 1e-3, 0.0, False, 0),
    "R_sp+R_cp@256": (2e-3, 1e-3, 0.0, False, 256),
    "L_orth": (0.0, 0.0, 1e-2, False, 0),
}
RANGES = {
    "return to owners": "moe_reg.R_sp.return",
    "Gram (forward)": "moe_reg.R_sp.gram",
    "Gram (backward)": "RowSpecializationBackward",
    "attachment": "moe_reg.R_sp.attach",
    "coupling": "moe_reg.R_cp",
    "routing metrics": "moe_reg.routing",
}
PROFILED = ("R_sp+R_cp", "measure")


def run_config(argv):
    """The pretrain configuration of the benchmark's model, as its runs parse it."""
    from megatron_moe_reg.errors import quiet_third_party_warnings
    from megatron_moe_reg.training.arguments import parse_args

    quiet_third_party_warnings()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    flags = ["--config", argv.config, "--mock-data", "--vocab-size", str(argv.vocab_size),
             "--micro-batch-size", str(argv.micro_batch_size), "--global-batch-size",
             str(argv.micro_batch_size * world), "--train-iters", "1000", "--eval-iters", "0",
             "--moe-specialization-loss-coeff", "1e-3", "--moe-coupling-loss-coeff", "1e-3",
             "--moe-weight-orthogonality-coeff", "1e-3"]
    if argv.num_layers:
        flags += ["--num-layers", str(argv.num_layers)]
    flags += argv.flags
    if world > 1:
        flags += ["--expert-model-parallel-size", str(world), "--moe-token-dispatcher-type", argv.dispatcher]
    return parse_args(flags, world_size=world)


def setup(argv):
    from megatron_moe_reg.training import trainer

    cfg = run_config(argv)
    return cfg, trainer.setup(cfg)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def run_step(ctx, data, variant: str) -> float:
    from megatron_moe_reg.integration.regularizers import StepPlan
    from megatron_moe_reg.training.step import train_step

    sp, cp, orth, measure, max_tokens = VARIANTS[variant]
    regs = ctx.regularizers
    regs.set_coefficients({"moe_specialization_loss_coeff": sp, "moe_coupling_loss_coeff": cp,
                           "moe_weight_orthogonality_coeff": orth})
    regs.components["specialization"].set_max_tokens(max_tokens)
    regs.begin_step(1, StepPlan(measure=measure, log=False))
    gc.collect()
    gc.disable()
    _sync()
    t0 = time.perf_counter()
    train_step(ctx, data)
    regs.finish_step(1)
    _sync()
    elapsed = time.perf_counter() - t0
    gc.enable()
    return elapsed


def trimmed_mean(values: list[float], trim: float = 0.2) -> float:
    """The mean of ``values`` without the lowest and highest ``trim`` fraction."""
    ordered = sorted(values)
    cut = int(trim * len(ordered))
    kept = ordered[cut : len(ordered) - cut] or ordered
    return sum(kept) / len(kept)


def bootstrap_interval(values: list[float], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of ``trimmed_mean(values)``."""
    rng = random.Random(seed)
    stats = sorted(trimmed_mean(rng.choices(values, k=len(values))) for _ in range(samples))
    return stats[int(0.025 * samples)], stats[int(0.975 * samples) - 1]


def timed_pair(ctx, data, variant: str, rng: random.Random) -> tuple[float, float]:
    """(variant's step time, its paired "off" step time), the two in random order."""
    if rng.random() < 0.5:
        off = run_step(ctx, data, "off")
        return run_step(ctx, data, variant), off
    measured = run_step(ctx, data, variant)
    return measured, run_step(ctx, data, "off")


def comm_floor(ctx, cfg, dispatcher: str) -> float:
    """Seconds per step of R_sp's exact extra communication alone (forward and backward)."""
    import torch.distributed as dist

    from megatron_moe_reg.integration.megatron.tracker import metrics_device

    m = cfg.model
    tokens = cfg.train.micro_batch_size * m.seq_length
    k, width = cfg.moe.moe_router_topk, cfg.moe.moe_ffn_hidden_size or m.ffn_hidden_size
    world = dist.get_world_size()
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    calls = len(ctx.regularizers.components["specialization"].probes) * cfg.num_microbatches
    device = metrics_device()
    rows = torch.randn((world if dispatcher == "allgather" else 1) * tokens * k, width, dtype=dtype, device=device)
    out = torch.empty_like(rows)
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):  # alltoall: rows back to their owners; allgather: the buffer summed onto them
        dist.all_to_all_single(out, rows)  # forward
        dist.all_to_all_single(rows, out)  # backward: the gradients out again
    _sync()
    return time.perf_counter() - t0


def breakdown(ctx, data, steps: int, variant: str) -> dict[str, tuple[float, float | None]]:
    """Milliseconds per ``variant`` step in each of the plugin's profiler ranges: (host time, and on a
    GPU the time of the kernels the range launched; None without CUDA). On a GPU the host time of a
    range is mostly kernel launches, which run asynchronously: its kernels' time is what it costs."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run_step(ctx, data, variant)
    events = {e.key: e for e in prof.key_averages()}
    out: dict[str, tuple[float, float | None]] = {}
    for name, key in RANGES.items():
        event = events.get(key)
        host = event.cpu_time_total / 1e3 / steps if event is not None else 0.0
        device = (event.device_time_total / 1e3 / steps if event is not None else 0.0) if cuda else None
        out[name] = (host, device)
    return out


def memory_probe(ctx, data, variant: str) -> dict:
    run_step(ctx, data, variant)  # warm-up (optimizer state allocated)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_step(ctx, data, variant)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"saved_mb": sum(storages.values()) / 2**20, "peak_mb": peak}


def common_args(argv) -> list[str]:
    out = ["--config", argv.config, "--vocab-size", str(argv.vocab_size), "--micro-batch-size",
           str(argv.micro_batch_size)]
    out += ["--num-layers", str(argv.num_layers)] if argv.num_layers else []
    return out + (["--", *argv.flags] if argv.flags else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/tiny_cpu.toml")
    p.add_argument("--rounds", type=int, default=48, help="timed rounds (each runs every variant once)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=0, help="override the config's layer count (0: keep)")
    p.add_argument("--ep", type=int, default=1, choices=[1, 2], help="expert-parallel processes")
    p.add_argument("--dispatcher", choices=["alltoall", "allgather"], default="alltoall")
    p.add_argument("--profile-steps", type=int, default=3, help="steps of each profiled variant")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    p.add_argument("--memory-probe", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--check-config", action="store_true", help="parse the run's configuration, then stop")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="after --: more moe-reg pretrain flags (e.g. --bf16)")
    argv = p.parse_args()
    argv.flags = [f for f in argv.flags if f != "--"]
    if argv.check_config:
        from megatron_moe_reg.training.input_checks import check_run_inputs

        check_run_inputs(run_config(argv))
        print("loss_overhead: configuration and inputs ok")
        return
    if argv.ep > 1 and "WORLD_SIZE" not in os.environ:  # run itself in argv.ep processes
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={argv.ep}",
               __file__, *sys.argv[1:]]
        sys.exit(subprocess.run(cmd).returncode)
    from megatron_moe_reg.training.data import make_loader

    cfg, ctx = setup(argv)
    data = iter(make_loader(ctx.datasets[0], cfg))
    if argv.memory_probe:
        print(json.dumps(memory_probe(ctx, data, argv.memory_probe)))
        return
    names = [v for v in VARIANTS if v != "off"]
    ratios: dict[str, list[float]] = {v: [] for v in names}
    times: dict[str, list[float]] = {v: [] for v in ["off", *names]}
    floors: list[float] = []
    rng = random.Random(1234)  # the same order on every rank
    for i in range(argv.rounds + 1):
        order = rng.sample(names, len(names))  # a new order each round: no variant always follows another
        pairs = {v: timed_pair(ctx, data, v, rng) for v in order}
        if argv.ep > 1:
            floor = comm_floor(ctx, cfg, argv.dispatcher)
        if i == 0:
            continue  # the first round warms up
        for v, (measured, off) in pairs.items():
            times[v].append(measured)
            times["off"].append(off)
            ratios[v].append(measured / off)
        if argv.ep > 1:
            floors.append(floor / statistics.median(off for _, off in pairs.values()))
    parts = {v: breakdown(ctx, data, argv.profile_steps, v) for v in PROFILED} if argv.profile_steps else {}
    if int(os.environ.get("RANK", "0")) != 0:
        return
    memory = {}
    if argv.ep == 1 and not argv.no_memory:
        for v in ["off", *names]:
            out = subprocess.run([sys.executable, __file__, "--memory-probe", v, *common_args(argv)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"memory probe {v} failed ({out.returncode}):\n{out.stderr[-3000:]}")
            memory[v] = json.loads(out.stdout.strip().splitlines()[-1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    layout = f"EP {argv.ep} ({argv.dispatcher})" if argv.ep > 1 else "one process"
    print(
        f"device: {device}, threads: {torch.get_num_threads()}, {layout}, config: {argv.config}, "
        f"{tokens} tokens/step, {argv.rounds} rounds (20 % trimmed mean of each variant's ratio to its "
        f"paired 'off' step, bootstrap 95 % interval)"
    )
    print(f"  {'off':<14} {1000 * statistics.median(times['off']):8.1f} ms/step")
    for v in names:
        low, high = bootstrap_interval(ratios[v])
        line = (
            f"  {v:<14} {1000 * statistics.median(times[v]):8.1f} ms/step  x{trimmed_mean(ratios[v]):.3f} "
            f"[{low:.3f}, {high:.3f}]"
        )
        if memory:
            saved, base = memory[v]["saved_mb"], memory["off"]["saved_mb"]
            line += f"   saved for backward {saved:8.1f} MiB  x{saved / base:.4f}"
            if memory[v]["peak_mb"] is not None:
                line += f"   peak {memory[v]['peak_mb']:.1f} MiB x{memory[v]['peak_mb'] / memory['off']['peak_mb']:.4f}"
        print(line)
    if floors:
        print(f"  floor: 'off' + R_sp's exact extra communication alone  x{1 + trimmed_mean(floors):.3f}")
    off_ms = 1000 * statistics.median(times["off"])
    for variant, ranges in parts.items():
        print(f"  {variant} breakdown, ms per step (profiled, {argv.profile_steps} steps; the profiler adds time):")
        for name, (host, device) in ranges.items():
            if device is None:
                print(f"    {name:<18} {host:7.2f} ms  ({100 * host / off_ms:.2f} % of an 'off' step)")
            else:
                print(f"    {name:<18} GPU {device:7.2f} ms  ({100 * device / off_ms:.2f} % of an 'off' step)"
                      f"   host {host:7.2f} ms")


if __name__ == "__main__":
    main()
