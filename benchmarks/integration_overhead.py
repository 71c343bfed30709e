"""Throughput and peak memory of the default configuration, and the integration's own overhead.

Builds the GPT-MoE of ``--config`` twice in one process: (a) from Megatron's block spec
(``get_gpt_decoder_block_spec``, its TopKRouter and experts) and (b) as ``moe-reg pretrain``
builds it with no plugin loss on (the plugin's block spec and router, its hooks installed, on a
step without measurement). Both get the same weights; forward+backward steps alternate between
them on the same batches, so the ratio is measured side by side. Peak memory is measured per
variant in a fresh subprocess.

    python benchmarks/integration_overhead.py [--config examples/tiny_cpu.toml] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def build(cfg, variant: str):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_moe_reg.integration.install import install, router_builder
    from megatron_moe_reg.integration.megatron.spec import gpt_block_spec
    from megatron_moe_reg.integration.regularizers import StepPlan
    from megatron_moe_reg.training import model as model_lib

    use_te = model_lib.use_transformer_engine(cfg)
    config = model_lib.transformer_config(cfg, use_te)
    if variant == "megatron":
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                          normalization=config.normalization, pp_rank=0)
    else:
        spec = gpt_block_spec(config, use_te, router=router_builder(cfg.plugin, cfg.model_shape()), pp_rank=0)
    torch.manual_seed(0)
    model = GPTModel(config=config, transformer_layer_spec=spec,
                     vocab_size=model_lib.padded_vocab_size(cfg.model.vocab_size, cfg),
                     max_sequence_length=cfg.model.max_position_embeddings,
                     position_embedding_type=cfg.model.position_embedding_type)
    assert parallel_state.model_parallel_is_initialized()
    if variant == "plugin":
        install([model], cfg.plugin).begin_step(1, StepPlan())
    if torch.cuda.is_available():
        model.cuda()
    if cfg.train.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return model


def batch(cfg, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.train.micro_batch_size, cfg.model.seq_length)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return tokens.to(device), torch.arange(shape[1]).expand(shape).to(device)


def step(model, tokens, positions) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def setup(argv):
    from megatron_moe_reg.errors import quiet_third_party_warnings
    from megatron_moe_reg.training import distributed
    from megatron_moe_reg.training.arguments import parse_args

    quiet_third_party_warnings()
    cfg = parse_args(["--config", argv.config, "--mock-data", "--vocab-size", str(argv.vocab_size),
                      "--micro-batch-size", str(argv.micro_batch_size)], world_size=1)
    distributed.initialize(cfg)
    return cfg


def peak_memory_mb(argv, variant: str) -> float:
    """Peak memory of a fresh process that builds ``variant`` and runs a few steps."""
    out = subprocess.run([sys.executable, __file__, "--config", argv.config, "--vocab-size", str(argv.vocab_size),
                          "--micro-batch-size", str(argv.micro_batch_size), "--memory-probe", variant],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="examples/tiny_cpu.toml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--memory-probe", choices=["megatron", "plugin"], help=argparse.SUPPRESS)
    argv = p.parse_args()
    cfg = setup(argv)
    if argv.memory_probe:
        model = build(cfg, argv.memory_probe)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for i in range(3):
            step(model, *batch(cfg, i))
        peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps({"peak_mb": peak}))
        return
    models = {v: build(cfg, v) for v in ("megatron", "plugin")}
    models["plugin"].load_state_dict(models["megatron"].state_dict())
    times = {v: [] for v in models}
    for i in range(argv.steps + 2):
        tokens, positions = batch(cfg, i)
        for v in (("megatron", "plugin") if i % 2 == 0 else ("plugin", "megatron")):
            t = step(models[v], tokens, positions)
            if i >= 2:  # warm-up
                times[v].append(t)
    tokens_per_step = cfg.train.micro_batch_size * cfg.model.seq_length
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}, threads: {torch.get_num_threads()}, config: {argv.config}, "
          f"{tokens_per_step} tokens per forward+backward, {argv.steps} steps each")
    med = {v: statistics.median(t) for v, t in times.items()}
    mem = {v: peak_memory_mb(argv, v) for v in models}
    for v in models:
        print(f"  {v:<9} {tokens_per_step / med[v]:>10,.0f} tokens/s   median {1000 * med[v]:7.1f} ms/step   "
              f"peak memory {mem[v]:8.1f} MiB")
    print(f"plugin / megatron: step time x{med['plugin'] / med['megatron']:.3f}, "
          f"peak memory x{mem['plugin'] / mem['megatron']:.3f}")


if __name__ == "__main__":
    main()
