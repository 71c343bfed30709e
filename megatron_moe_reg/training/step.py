"""One optimizer step and one evaluation pass through Megatron's pipeline schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_moe_reg.training.data import batch_to_device
from megatron_moe_reg.training.finite import NonFiniteGradNorm, checked_grad_norm

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.transformer_config import TransformerConfig
    from torch.utils.data import Dataset

    from megatron_moe_reg.integration.install import Regularizers
    from megatron_moe_reg.training.arguments import RunConfig
    from megatron_moe_reg.training.tokenizer import Tokenizer


@dataclass
class TrainingContext:
    """Everything a step needs; built once by ``trainer.setup``."""

    cfg: RunConfig
    config: TransformerConfig
    model: list[DistributedDataParallel]  # the wrapped model chunks
    gpt_model: GPTModel  # the GPTModel inside chunk 0
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    tokenizer: Tokenizer
    datasets: tuple[Dataset | None, Dataset | None, Dataset | None] = (None, None, None)
    regularizers: Regularizers | None = None  # None when no plugin module is installed


class NonFiniteStep(Exception):
    """The step stopped before its update: the gradient norm, and the LM loss of the step."""

    def __init__(self, grad_norm: float, lm_loss: float):
        super().__init__(f"gradient norm {grad_norm}, LM loss {lm_loss:.6g}")
        self.grad_norm, self.lm_loss = grad_norm, lm_loss


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token-sum LM loss; the schedule divides by the token count (Megatron-LM's form)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    if parallel_state.get_context_parallel_world_size() > 1:
        stats = torch.stack([loss, num_tokens.float()])
        dist.all_reduce(stats, group=parallel_state.get_context_parallel_group())
        loss, num_tokens = stats[0], stats[1].to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.detach().float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    batch = batch_to_device(next(data_iterator) if data_iterator is not None else None)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def _share_from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """Sum over DP (the last stage's reports), then make it visible on every pipeline stage."""
    if parallel_state.is_pipeline_last_stage():
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    else:
        values.zero_()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    return values


def _reduce_lm_loss(losses_reduced: list[dict]) -> tuple[float, float]:
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses_reduced:
        totals += item["lm loss"].to(totals)
    totals = _share_from_last_stage(totals)
    return float(totals[0]), float(totals[1])


def _run_schedule(ctx: TrainingContext, data_iterator, forward_only: bool):
    cfg = ctx.cfg
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=ctx.model,
        num_microbatches=cfg.num_microbatches,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        decoder_seq_length=cfg.model.seq_length,
        forward_only=forward_only,
    )


def train_step(ctx: TrainingContext, data_iterator) -> dict:
    """Forward/backward over all micro-batches, optimizer and LR-scheduler step."""
    for chunk in ctx.model:
        chunk.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    losses_reduced = _run_schedule(ctx, data_iterator, forward_only=False)
    try:
        with checked_grad_norm(ctx.optimizer, ctx.cfg.train.check_for_nan_in_loss_and_grad):
            update_successful, grad_norm, _ = ctx.optimizer.step()
    except NonFiniteGradNorm as e:
        loss_sum, tokens = _reduce_lm_loss(losses_reduced)
        raise NonFiniteStep(e.norm, loss_sum / max(tokens, 1.0)) from None
    if update_successful:
        ctx.scheduler.step(increment=ctx.cfg.global_batch_size)
    loss_sum, tokens = _reduce_lm_loss(losses_reduced)
    return {
        "lm loss": loss_sum / max(tokens, 1.0),
        "tokens": tokens,
        "grad norm": float(grad_norm) if grad_norm is not None else math.nan,
        "skipped": not update_successful,
        "lr": ctx.optimizer.param_groups[0]["lr"],
    }


@torch.no_grad()
def evaluate(ctx: TrainingContext, make_iterator, iters: int) -> dict | None:
    """Mean validation loss and perplexity over ``iters`` global batches."""
    for chunk in ctx.model:
        chunk.eval()
    data_iterator = make_iterator()
    loss_sum = tokens = 0.0
    try:
        for _ in range(iters):
            s, n = _reduce_lm_loss(_run_schedule(ctx, data_iterator, forward_only=True))
            loss_sum, tokens = loss_sum + s, tokens + n
    finally:
        for chunk in ctx.model:
            chunk.train()
    if tokens == 0:
        return None
    loss = loss_sum / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
