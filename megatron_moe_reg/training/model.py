"""GPT-MoE on megatron-core: TransformerConfig from the run options, GPTModel, Megatron DDP."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.integration.megatron.spec import gpt_block_spec
from megatron_moe_reg.training.arguments import RunConfig
from megatron_moe_reg.training.distributed import on_gpu


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401  # importable at all: the import is the test
    except ImportError:
        return False
    return True


def use_transformer_engine(cfg: RunConfig) -> bool:
    """Whether the layers are TransformerEngine's (``arguments.fit_to_machine`` chose the default)."""
    if cfg.model.transformer_impl != "transformer_engine":
        return False
    if not (on_gpu() and te_available()):
        raise ConfigError(
            "--transformer-impl transformer_engine needs a GPU and TransformerEngine; use --transformer-impl local"
        )
    return True


def padded_vocab_size(vocab_size: int, cfg: RunConfig) -> int:
    """Megatron-LM's padding: a multiple of make-vocab-size-divisible-by x TP."""
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_config(cfg: RunConfig, use_te: bool, experts: str = "sequential") -> TransformerConfig:
    m, moe, p, t, f = cfg.model, cfg.moe, cfg.parallel, cfg.train, cfg.fusion
    gpu = on_gpu()
    if p.context_parallel_size > 1 and not use_te:
        raise ConfigError(
            "--context-parallel-size > 1 needs TransformerEngine attention "
            "(--transformer-impl transformer_engine on GPU)"
        )
    if experts == "te" and not use_te:
        raise ConfigError(
            "--moe-grouped-gemm / --moe-grouped-gemm-backend te need TransformerEngine (GPU); "
            "without it use --moe-grouped-gemm-backend sequential, triton or torch"
        )
    dtype = torch.bfloat16 if t.bf16 else torch.float32
    kwargs: dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups if m.group_query_attention else None,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.kv_channels,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        normalization=m.normalization,
        layernorm_epsilon=m.layernorm_epsilon,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=m.add_bias_linear,
        init_method_std=m.init_method_std,
        bf16=t.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        sequence_parallel=p.sequence_parallel,
        calculate_per_token_loss=t.calculate_per_token_loss,
        recompute_granularity=p.recompute_granularity,
        recompute_method=p.recompute_method,
        recompute_num_layers=p.recompute_num_layers,
        use_cpu_initialization=not gpu,
        gradient_accumulation_fusion=f.gradient_accumulation_fusion,  # arguments.fit_to_machine fits these
        bias_activation_fusion=f.bias_swiglu_fusion if m.swiglu else f.bias_gelu_fusion,  # as Megatron-LM
        bias_dropout_fusion=f.bias_dropout_fusion,
        masked_softmax_fusion=f.masked_softmax_fusion,
        apply_rope_fusion=f.apply_rope_fusion,
        persist_layer_norm=not f.no_persist_layer_norm,
        deallocate_pipeline_outputs=True,  # as Megatron-LM: a stage's sent activations keep no storage
        attention_softmax_in_fp32=t.attention_softmax_in_fp32,
        cp_comm_type="p2p",  # Megatron-LM's default --cp-comm-type
        transformer_impl=m.transformer_impl,
    )
    if p.recompute_modules is not None:
        kwargs["recompute_modules"] = p.recompute_modules
    if moe.num_experts:
        # MoE options have TransformerConfig's names, except the number of experts.
        kwargs.update({f.name: getattr(moe, f.name) for f in dataclasses.fields(moe) if f.name != "num_experts"})
        kwargs["num_moe_experts"] = moe.num_experts
        kwargs["moe_grouped_gemm"] = experts == "te"
    try:
        return TransformerConfig(**kwargs)
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"megatron-core rejected the model configuration: {e}") from None


def build_gpt_model(
    cfg: RunConfig,
    config: TransformerConfig,
    vocab_size: int,
    use_te: bool,
    router=None,
    experts=None,
    grouped_backend=None,
) -> GPTModel:
    """GPTModel for this pipeline stage, from Megatron's spec with plugin modules swapped in."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    spec = gpt_block_spec(
        config, use_te, router=router, experts=experts, grouped_backend=grouped_backend, pp_rank=pp_rank
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, cfg),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.model.position_embedding_type,
        rotary_base=cfg.model.rotary_base,
    )
    return model


def wrap_model(cfg: RunConfig, config: TransformerConfig, model: torch.nn.Module) -> list[torch.nn.Module]:
    """Move to the device, bf16-wrap and wrap in Megatron's DistributedDataParallel."""
    if on_gpu():
        model.cuda(torch.cuda.current_device())
    if cfg.train.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=bool(cfg.parallel.use_distributed_optimizer),
        check_for_nan_in_grad=False,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    return [ddp]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Global (total, expert) parameter counts: local counts summed over all ranks, divided by
    the number of replicas (data-parallel for dense weights, expert-data-parallel for experts)."""
    import torch.distributed as dist

    named = list(model.named_parameters())
    expert = sum(p.numel() for name, p in named if ".experts." in name and "shared_experts" not in name)
    dense = sum(p.numel() for _, p in named) - expert
    counts = torch.tensor(
        [dense, expert], dtype=torch.float64, device=torch.cuda.current_device() if on_gpu() else "cpu"
    )
    dist.all_reduce(counts)
    dense_total = counts[0] / parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    expert_total = counts[1] / parallel_state.get_expert_data_parallel_world_size()
    return int(dense_total + expert_total), int(expert_total)
