"""``moe-reg``: the command-line entry; each command name maps to the ``module:function`` it runs."""

from __future__ import annotations

import importlib
import sys

from megatron_moe_reg.errors import quiet_third_party_warnings, run_guarded

# name -> (entry point, one-line description); entry points take the remaining arguments
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": (
        "megatron_moe_reg.pretrain:main",
        "pretrain a GPT-MoE on megatron-core (also: torchrun -m megatron_moe_reg.pretrain)",
    ),
    "prepare-data": (
        "megatron_moe_reg.training.prepare_data:main",
        "build a tokenizer and Megatron indexed datasets (default: the embedded corpus)",
    ),
    "analyze": (
        "megatron_moe_reg.analysis.cli:main",
        "routing report of checkpoints: metrics.json, plots and index.html",
    ),
    "check-config": (
        "megatron_moe_reg.pretrain:check_main",
        "check a pretrain configuration and its inputs in one process: --world-size N <pretrain flags>",
    ),
    "megatron-lm": (
        "megatron_moe_reg.integration.megatron_lm.entry:main",
        "Megatron-LM's own pretrain() with the plugin, from megatron-core 0.19+'s megatron.training",
    ),
    "study": (
        "megatron_moe_reg.studies.cli:main",
        "paired-seed study: variants x seeds as real runs, evaluated on fixed tokens, one comparison report",
    ),
    "adapt": (
        "megatron_moe_reg.analysis.adapt:main",
        "fine-tune the experts of a held-out domain and measure interference (SR-MoE's test)",
    ),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: moe-reg COMMAND [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(_usage())
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"moe-reg: error: unknown command '{argv[0]}'\n")
            return 2
        return 0
    quiet_third_party_warnings()
    module_name, function_name = COMMANDS[argv[0]][0].split(":")
    entry = getattr(importlib.import_module(module_name), function_name)
    return run_guarded(entry, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
