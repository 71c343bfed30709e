"""One step of the plugin losses alone, for gradient comparisons across parallel layouts.

    torchrun --nproc-per-node N tests/grad_probe.py OUT_DIR [--lm-loss-scale S] [pretrain flags incl. --load]

Loads the checkpoint, runs one global batch of forward/backward through Megatron's schedule
with the LM loss multiplied by S (default 0: only the auxiliary losses produce gradients), lets
DDP and ``finalize_model_grads`` reduce the gradients, and writes:

  OUT_DIR/grads/     the reduced gradients as a dist checkpoint (read back with
                     ``read_model_tensors``: full tensors whatever layout wrote them)
  OUT_DIR/values.json  the plugin's reported per-layer values (rank 0)
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path


def main(argv: list[str]) -> None:
    from megatron_moe_reg.errors import quiet_third_party_warnings

    quiet_third_party_warnings()
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_moe_reg.integration.regularizers import StepPlan
    from megatron_moe_reg.training import checkpointing, distributed, trainer
    from megatron_moe_reg.training.arguments import parse_args
    from megatron_moe_reg.training.data import make_loader, needs_data
    from megatron_moe_reg.training.step import batch_to_device, loss_func

    out = Path(argv[0])
    rest = argv[1:]
    lm_scale = 0.0
    if rest[:1] == ["--lm-loss-scale"]:
        lm_scale, rest = float(rest[1]), rest[2:]
    cfg = parse_args(rest)
    ctx = trainer.setup(cfg)
    checkpointing.load_checkpoint(ctx)
    regs = ctx.regularizers

    def forward_step(data_iterator, model):
        batch = batch_to_device(next(data_iterator) if data_iterator is not None else None)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def scaled_lm_loss(output_tensor):
            loss, num_tokens, report = loss_func(batch["loss_mask"], output_tensor)
            return loss * lm_scale, num_tokens, report

        return output, scaled_lm_loss if batch["loss_mask"] is not None else partial(loss_func, None)

    data = iter(make_loader(ctx.datasets[0], cfg)) if needs_data() else None
    for chunk in ctx.model:
        chunk.zero_grad_buffer()
    regs.begin_step(1, StepPlan(measure=True, expensive=True))
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=ctx.model,
        num_microbatches=cfg.num_microbatches, seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size, decoder_seq_length=cfg.model.seq_length,
        forward_only=False)
    values = regs.finish_step(1)
    with torch.no_grad():
        for param in ctx.gpt_model.parameters():
            grad = getattr(param, "main_grad", None)
            param.copy_(torch.zeros_like(param) if grad is None else grad.to(param.dtype))
    if dist.get_rank() == 0:
        (out / "grads").mkdir(parents=True, exist_ok=True)
        (out / "values.json").write_text(json.dumps(values))
    dist.barrier()
    dist_checkpointing.save({"model": ctx.gpt_model.sharded_state_dict()}, str(out / "grads"))
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
