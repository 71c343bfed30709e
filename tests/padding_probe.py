"""The plugin's values on one right-padded micro-batch, with a padding mask and without.

    torchrun --nproc-per-node 1 tests/padding_probe.py OUT.json [pretrain flags]

Builds the model as ``moe-reg pretrain`` does, runs three training-mode forwards of one batch whose last
8 positions are padding (megatron-core 0.19's ``padding_mask``, True = padding): masked, masked with
other token ids at the padded positions, and unmasked; writes the plugin's reported values of each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    from megatron_moe_reg.errors import quiet_third_party_warnings

    quiet_third_party_warnings()
    import torch
    import torch.distributed as dist

    from megatron_moe_reg.integration.regularizers import StepPlan
    from megatron_moe_reg.training import distributed, trainer
    from megatron_moe_reg.training.arguments import parse_args

    out = Path(argv[0])
    cfg = parse_args(argv[1:])
    ctx = trainer.setup(cfg)
    regs = ctx.regularizers
    torch.manual_seed(0)
    batch, seq, vocab = cfg.train.micro_batch_size, cfg.model.seq_length, ctx.tokenizer.vocab_size
    tokens = torch.randint(0, vocab - 1, (batch, seq))
    positions = torch.arange(seq).expand(batch, seq)
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    padding[:, -8:] = True
    other = tokens.clone()
    other[padding] = (tokens[padding] + 7) % (vocab - 1)
    for chunk in ctx.model:
        chunk.train()

    def values(step: int, ids, mask) -> dict:
        regs.begin_step(step, StepPlan(measure=True, expensive=True))
        ctx.model[0](ids, positions, None, labels=ids, padding_mask=mask)
        return regs.finish_step(step)

    result = {
        "masked": values(1, tokens, padding),
        "masked_other_padding": values(2, other, padding),
        "unmasked": values(3, tokens, None),
    }
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result))
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
