"""Pretraining on megatron-core: setup (model, optimizer, data) and the training loop."""

from __future__ import annotations

import math
import time

from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_moe_reg.errors import RunStopped
from megatron_moe_reg.experts.selection import choose_backend
from megatron_moe_reg.integration.install import StepPolicy, install, router_builder
from megatron_moe_reg.integration.megatron import compat
from megatron_moe_reg.training import checkpointing, distributed
from megatron_moe_reg.training import model as model_lib
from megatron_moe_reg.training.arguments import RunConfig
from megatron_moe_reg.training.data import build_datasets, make_loader, needs_data
from megatron_moe_reg.training.preemption import EarlyExit
from megatron_moe_reg.training.reporting import Reporter
from megatron_moe_reg.training.routing_trace import start_trace
from megatron_moe_reg.training.step import NonFiniteStep, TrainingContext, evaluate, train_step
from megatron_moe_reg.training.tokenizer import build_tokenizer

_AUX_LOSS_NAMES = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}


def optimizer_config(cfg: RunConfig, params_dtype) -> OptimizerConfig:
    """Megatron's OptimizerConfig of the run (Adam, as Megatron-LM's default --optimizer)."""
    t = cfg.train
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        params_dtype=params_dtype,
        use_distributed_optimizer=bool(cfg.parallel.use_distributed_optimizer),
    )


def build_optimizer(cfg: RunConfig, model_chunks: list):
    t = cfg.train
    # no config_overrides: megatron-core's standard ones, as Megatron-LM's (no weight decay on biases
    # and 1-D parameters)
    optimizer = get_megatron_optimizer(optimizer_config(cfg, model_chunks[0].config.params_dtype), model_chunks)
    # Megatron-LM's scheduler counts samples (steps x global batch), so its state loads in either trainer.
    gbs = cfg.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters * gbs,
        lr_decay_steps=cfg.lr_decay_iters * gbs,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters * gbs,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def setup(cfg: RunConfig, experts=None) -> TrainingContext:
    """Initialize parallel state and build tokenizer, model, optimizer, scheduler and datasets."""
    compat.check_version()
    distributed.initialize(cfg)
    use_te = model_lib.use_transformer_engine(cfg)
    tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size)
    shape = cfg.model_shape()
    experts_backend, experts_choice = choose_backend(cfg.plugin.moe_grouped_gemm_backend, shape)
    config = model_lib.transformer_config(cfg, use_te, experts_backend)
    router = router_builder(cfg.plugin, shape)
    gpt = model_lib.build_gpt_model(
        cfg, config, tokenizer.vocab_size, use_te, router=router, experts=experts, grouped_backend=experts_backend
    )
    chunks = model_lib.wrap_model(cfg, config, gpt)
    policy = StepPolicy.of(cfg.plugin, cfg.log.log_interval)
    regularizers = install(chunks, cfg.plugin, policy) if router is not None else None
    optimizer, scheduler = build_optimizer(cfg, chunks)
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if cfg.parallel.overlap_grad_reduce:
        config.grad_sync_func = chunks[0].start_grad_sync
    datasets = build_datasets(cfg, tokenizer) if needs_data() else (None, None, None)
    _print_summary(cfg, config, gpt, tokenizer, use_te, experts_backend)
    if experts_choice:
        distributed.print_rank0(f"experts: {experts_backend} ({experts_choice})")
    if regularizers is not None and regularizers.skipped_coupling_pairs:
        distributed.print_rank0(
            f"note: coupling pairs {regularizers.skipped_coupling_pairs} straddle a "
            "pipeline stage without MoE layers and are skipped"
        )
    return TrainingContext(
        cfg=cfg,
        config=config,
        model=chunks,
        gpt_model=gpt,
        optimizer=optimizer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        datasets=datasets,
        regularizers=regularizers,
    )


def _print_summary(cfg: RunConfig, config, gpt, tokenizer, use_te: bool, experts_backend: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_moe_reg.integration.megatron import cpu_runtime

    total, expert = model_lib.count_parameters(gpt)
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    device = (
        "GPU (nccl)" if distributed.on_gpu() else "CPU (gloo, CPU runtime layer)" if cpu_runtime.is_active() else "CPU"
    )
    n_moe = cfg.model_shape().num_moe_layers
    active = total - expert + (expert * moe.moe_router_topk // moe.num_experts if moe.num_experts else 0)
    distributed.print_rank0(
        f"megatron-core {compat.MCORE_VERSION} | {device} | "
        f"{'TransformerEngine' if use_te else 'local'} spec\n"
        f"world {cfg.world_size}: TP {p.tensor_model_parallel_size} PP {p.pipeline_model_parallel_size} "
        f"EP {p.expert_model_parallel_size} ETP {p.expert_tensor_parallel_size} "
        f"CP {p.context_parallel_size} DP {ps.get_data_parallel_world_size()}"
        f"{' SP' if p.sequence_parallel else ''}\n"
        f"GPT-MoE: {m.num_layers} layers ({n_moe} MoE, {moe.num_experts or 0} experts, top-{moe.moe_router_topk}"
        f"{', dispatcher ' + moe.moe_token_dispatcher_type if moe.num_experts else ''}"
        f"{', experts ' + experts_backend if moe.num_experts else ''}), hidden {m.hidden_size}, "
        f"vocab {tokenizer.vocab_size} | parameters {total / 1e6:.2f}M, active per token {active / 1e6:.2f}M\n"
        f"global batch {cfg.train.global_batch_size} x {m.seq_length} tokens, "
        f"{cfg.num_microbatches} micro-batch(es) of {cfg.train.micro_batch_size}, {cfg.train.train_iters} steps"
    )
    for notice in [*cfg.machine_notes, *cfg.notices()]:
        distributed.print_rank0(f"note: {notice}")


def megatron_moe_track_names(cfg: RunConfig) -> list[str]:
    moe = cfg.moe
    names = []
    if moe.moe_aux_loss_coeff > 0 and moe.moe_router_load_balancing_type in _AUX_LOSS_NAMES:
        names.append(_AUX_LOSS_NAMES[moe.moe_router_load_balancing_type])
    if moe.moe_z_loss_coeff:
        names.append("z_loss")
    return names


def _report_moe(ctx: TrainingContext, iteration: int, writer) -> dict:
    cfg = ctx.cfg
    if not cfg.moe.num_experts:
        return {}
    names = megatron_moe_track_names(cfg)
    if not names:
        compat.clear_megatron_moe_tracker()
        return {}
    return compat.report_megatron_moe_losses(
        loss_scale=1.0 / cfg.num_microbatches,
        iteration=iteration,
        writer=writer,
        track_names=names,
        num_layers=ctx.config.num_layers,
        moe_layer_freq=ctx.config.moe_layer_freq,
        per_layer_logging=cfg.moe.moe_per_layer_logging,
    )


def _valid_iterator_factory(ctx: TrainingContext):
    valid = ctx.datasets[1]
    if valid is None and needs_data():
        return None

    def make():
        return iter(make_loader(valid, ctx.cfg)) if needs_data() else None

    return make


def _last_checkpoint(cfg: RunConfig) -> str:
    for root in filter(None, (cfg.ckpt.save, cfg.ckpt.load)):
        last = checkpointing.last_checkpoint(root)
        if last is not None:
            return f"{last} (resume with --load {root})"
    return "none (no --save)" if not cfg.ckpt.save else "none yet"


def _non_finite_message(ctx: TrainingContext, iteration: int, stop: NonFiniteStep) -> str:
    """Which quantity was not finite: the LM loss, the plugin's losses of this step (those it recorded:
    every layer's on a log step)."""
    recorded = ctx.regularizers.finish_step(iteration, None) if ctx.regularizers is not None else {}
    losses = [name for name, value in recorded.items() if "loss" in name and not math.isfinite(value)]
    found = f"LM loss {stop.lm_loss:.6g}" + (f"; not finite: {', '.join(losses)}" if losses else "")
    return (
        f"iteration {iteration}: the gradient norm is {stop.grad_norm} ({found}); the update was "
        f"not applied. Last good checkpoint: {_last_checkpoint(ctx.cfg)}. Lower --lr or the loss coefficients, "
        "or pass --no-check-for-nan-in-loss-and-grad to apply such steps"
    )


def train(ctx: TrainingContext) -> dict:
    """The training loop. Returns the last step's metrics and the last validation result."""
    cfg = ctx.cfg
    iteration, consumed = checkpointing.load_checkpoint(ctx) if cfg.ckpt.load else (0, 0)
    loader = make_loader(ctx.datasets[0], cfg, consumed) if needs_data() else None
    train_iter = iter(loader) if loader is not None else None
    make_valid = _valid_iterator_factory(ctx)
    reporter = Reporter(cfg, iteration)
    last: dict = {}
    validation: dict | None = None
    saved_at = None
    early_exit = EarlyExit(
        cfg.train.exit_signal_handler, cfg.train.exit_duration_in_mins, "cuda" if distributed.on_gpu() else "cpu"
    )
    preempted = False
    trace = start_trace(cfg, ctx.model, iteration)
    try:
        while iteration < cfg.train.train_iters:
            started = time.time()
            regularizers = ctx.regularizers
            if regularizers is not None:
                regularizers.begin_step(iteration + 1)
            try:
                metrics = train_step(ctx, train_iter)
            except NonFiniteStep as e:
                raise RunStopped(_non_finite_message(ctx, iteration + 1, e)) from None
            metrics.update(_report_moe(ctx, iteration + 1, reporter.writer))
            if regularizers is not None:
                metrics.update(regularizers.finish_step(iteration + 1, reporter.writer))
            iteration += 1
            consumed += cfg.global_batch_size
            if trace is not None:
                trace.end_step(iteration)
            reporter.step(iteration, metrics, time.time() - started)
            last = metrics
            if (
                make_valid
                and cfg.eval.eval_interval
                and iteration % cfg.eval.eval_interval == 0
                and iteration < cfg.train.train_iters
            ):
                validation = evaluate(ctx, make_valid, cfg.eval.eval_iters)
                reporter.evaluation(iteration, validation)
            if cfg.ckpt.save and cfg.ckpt.save_interval and iteration % cfg.ckpt.save_interval == 0:
                checkpointing.save_checkpoint(ctx, iteration, consumed)
                saved_at = iteration
            if cfg.train.exit_interval and iteration % cfg.train.exit_interval == 0:
                break
            stop = early_exit.reason()
            if stop:
                distributed.print_rank0(f"{stop}: saving and stopping after iteration {iteration}")
                preempted = True
                break
        if make_valid and cfg.eval.eval_iters > 0 and not preempted:
            validation = evaluate(ctx, make_valid, cfg.eval.eval_iters)
            reporter.evaluation(iteration, validation)
        if cfg.ckpt.save and saved_at != iteration:
            checkpointing.save_checkpoint(ctx, iteration, consumed)
    finally:
        if trace is not None:
            trace.close()
        early_exit.close()
        reporter.close()
    return {"iteration": iteration, "train": last, "validation": validation}
