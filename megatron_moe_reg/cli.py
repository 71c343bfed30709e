"""``moe-reg``: the command-line entry (``pretrain``, ``prepare-data``, ``analyze``, ``adapt``)."""

from __future__ import annotations

import os
import sys
import warnings

COMMANDS = {
    "pretrain": "pretrain a GPT-MoE on megatron-core (also: torchrun -m megatron_moe_reg.pretrain)",
    "prepare-data": "build a tokenizer and Megatron indexed datasets (default: the embedded corpus)",
    "analyze": "routing report of checkpoints: metrics.json, plots and index.html",
    "adapt": "fine-tune the experts of a held-out domain and measure interference (SR-MoE's test)",
}


def quiet_third_party_warnings() -> None:
    """Warnings megatron-core and torch print on every rank that say nothing about the run."""
    warnings.filterwarnings("ignore", message="Apex is not installed")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*is deprecated. Please use `torch.distributed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated")
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def run_guarded(fn, argv) -> int:
    """Run a command; configuration errors become one line on stderr and exit status 2."""
    from megatron_moe_reg.errors import ConfigError

    try:
        return fn(argv) or 0
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"moe-reg: error: {e}\n")
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
        print("usage: moe-reg COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"moe-reg: error: unknown command '{argv[0]}'\n")
            return 2
        return 0
    quiet_third_party_warnings()
    command, rest = argv[0], argv[1:]
    if command == "pretrain":
        from megatron_moe_reg.pretrain import main as pretrain_main

        return run_guarded(pretrain_main, rest)
    if command == "analyze":
        from megatron_moe_reg.analysis.cli import main as analyze_main

        return run_guarded(analyze_main, rest)
    if command == "adapt":
        from megatron_moe_reg.analysis.adapt import main as adapt_main

        return run_guarded(adapt_main, rest)
    from megatron_moe_reg.training.prepare_data import main as prepare_main

    return run_guarded(prepare_main, rest)


if __name__ == "__main__":
    sys.exit(main())
