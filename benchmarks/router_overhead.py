"""Router cost: forward+backward of each router vs Megatron's TopKRouter, and end-to-end steps.

Part 1 times ``router(x)`` forward and backward (through the probabilities) for Megatron's
``TopKRouter`` and every plugin router on the same input, alternating, at ``--tokens x --hidden``
with ``--experts`` experts and eigen rank ``--rank``. Defaults: the realistic shape 8192 x 2048,
E = 64, r = 64 on GPU; 2048 x 512, E = 16, r = 16 on CPU (pass the realistic one explicitly).

Part 2 builds the default configuration (``--config``, z-loss off, which the prototype router
refuses) once per router type and alternates full training steps between them: the step-time
ratio of each router to ``topk``.

    python benchmarks/router_overhead.py [--tokens 8192 --hidden 2048 --experts 64 --rank 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

KINDS = ("topk", "spectral", "prototype", "ermoe", "emoe")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def router_part(argv) -> None:
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_reg.config import PluginConfig
    from megatron_moe_reg.routers import ROUTERS

    config = TransformerConfig(num_layers=1, hidden_size=argv.hidden, num_attention_heads=8,
                               num_moe_experts=argv.experts, moe_router_topk=argv.topk, moe_router_dtype="fp32",
                               use_cpu_initialization=True, add_bias_linear=False, moe_aux_loss_coeff=1e-2,
                               moe_ffn_hidden_size=argv.hidden)
    pg = get_default_pg_collection()
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    routers = {"megatron": TopKRouter(config=config, pg_collection=pg)}
    for kind in KINDS:
        extra = {"moe_eigen_rank": argv.rank} if kind in ("ermoe", "emoe") else {}
        plugin = PluginConfig(moe_router_type=kind, **extra)
        routers[kind] = ROUTERS[kind](config=config, pg_collection=pg, plugin=plugin)
    for r in routers.values():
        r.set_layer_number(1)
        r.to(device).train()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    x = torch.randn(argv.tokens, 1, argv.hidden, device=device, dtype=dtype, requires_grad=True)
    times = {k: [] for k in routers}
    for i in range(argv.router_iters + 2):
        for name, router in routers.items():
            _sync()
            t0 = time.perf_counter()
            probs, _ = router(x)
            probs.float().sum().backward()
            _sync()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["megatron"])
    print(f"router forward+backward, {argv.tokens} tokens x hidden {argv.hidden}, E={argv.experts}, "
          f"top-{argv.topk}, eigen rank {argv.rank}, {dtype}, median of {argv.router_iters}:")
    for name, t in times.items():
        print(f"  {name:<9} {1000 * statistics.median(t):9.2f} ms  x{statistics.median(t) / base:.2f}")


def step_part(argv) -> None:
    from megatron_moe_reg.integration.regularizers import StepPlan
    from megatron_moe_reg.training import trainer
    from megatron_moe_reg.training.arguments import parse_args
    from megatron_moe_reg.training.data import make_loader
    from megatron_moe_reg.training.step import train_step

    contexts = {}
    for kind in KINDS:
        extra = ["--moe-eigen-rank", str(min(argv.rank, 16))] if kind in ("ermoe", "emoe") else []
        cfg = parse_args(["--config", argv.config, "--mock-data", "--vocab-size", "4096", "--micro-batch-size", "4",
                          "--global-batch-size", "4", "--train-iters", "1000", "--eval-iters", "0",
                          "--moe-z-loss-coeff", "0", "--moe-router-type", kind, *extra], world_size=1)
        ctx = trainer.setup(cfg)
        contexts[kind] = (ctx, iter(make_loader(ctx.datasets[0], cfg)))
    times = {k: [] for k in contexts}
    for i in range(argv.steps + 1):
        for kind, (ctx, data) in contexts.items():
            ctx.regularizers.begin_step(1, StepPlan())
            _sync()
            t0 = time.perf_counter()
            train_step(ctx, data)
            _sync()
            ctx.regularizers.finish_step(1)
            if i > 0:
                times[kind].append(time.perf_counter() - t0)
    base = statistics.median(times["topk"])
    print(f"training step, {argv.config} (4 x 256 tokens), median of {argv.steps}:")
    for kind, t in times.items():
        print(f"  {kind:<9} {1000 * statistics.median(t):8.1f} ms/step  x{statistics.median(t) / base:.3f}")


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192 if gpu else 2048)
    p.add_argument("--hidden", type=int, default=2048 if gpu else 512)
    p.add_argument("--experts", type=int, default=64 if gpu else 16)
    p.add_argument("--rank", type=int, default=64 if gpu else 16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--router-iters", type=int, default=10)
    p.add_argument("--config", default="examples/tiny_cpu.toml")
    p.add_argument("--steps", type=int, default=6)
    argv = p.parse_args()
    from megatron_moe_reg.errors import quiet_third_party_warnings
    from megatron_moe_reg.training import distributed
    from megatron_moe_reg.training.arguments import parse_args

    quiet_third_party_warnings()
    distributed.initialize(parse_args(["--mock-data", "--vocab-size", "64"], world_size=1))
    device = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}")
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_reg.integration.megatron.compat import reset_megatron_moe_tracker

    router_part(argv)
    # standalone backwards leave Megatron's aux-loss scale as a 0-d tensor the schedules cannot fill
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    reset_megatron_moe_tracker()
    step_part(argv)


if __name__ == "__main__":
    main()
