"""Pretraining entry: ``moe-reg pretrain ...`` or ``torchrun ... -m megatron_moe_reg.pretrain ...``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from megatron_moe_reg.training.arguments import parse_args

    cfg = parse_args(argv)
    from megatron_moe_reg.training import distributed, trainer

    try:
        ctx = trainer.setup(cfg)
        trainer.train(ctx)
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    from megatron_moe_reg.errors import quiet_third_party_warnings, run_guarded

    quiet_third_party_warnings()
    sys.exit(run_guarded(main, sys.argv[1:]))
