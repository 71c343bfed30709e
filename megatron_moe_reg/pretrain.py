"""Pretraining entry: ``moe-reg pretrain ...`` or ``torchrun ... -m megatron_moe_reg.pretrain ...``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from megatron_moe_reg.training.arguments import parse_args

    cfg = parse_args(argv)
    from megatron_moe_reg.training import distributed, trainer
    from megatron_moe_reg.training.input_checks import check_run_inputs

    check_run_inputs(cfg)
    try:
        ctx = trainer.setup(cfg)
        trainer.train(ctx)
    finally:
        distributed.teardown()
    return 0


def check_main(argv: list[str]) -> int:
    """``moe-reg check-config --world-size N <pretrain flags>``: the configuration and every input and
    output location of a run, in one process (the launchers run it before torchrun)."""
    from megatron_moe_reg.errors import ConfigError
    from megatron_moe_reg.training.arguments import parse_args
    from megatron_moe_reg.training.input_checks import check_run_inputs

    if argv[:1] != ["--world-size"] or len(argv) < 2 or not argv[1].isdigit() or int(argv[1]) < 1:
        raise ConfigError("check-config: start with --world-size N (the processes the run will have)")
    world_size = int(argv[1])
    cfg = parse_args(argv[2:], world_size=world_size)
    check_run_inputs(cfg)
    print(f"moe-reg: configuration and inputs ok for {world_size} process(es)")
    return 0


if __name__ == "__main__":
    from megatron_moe_reg.errors import quiet_third_party_warnings, run_guarded

    quiet_third_party_warnings()
    sys.exit(run_guarded(main, sys.argv[1:]))
