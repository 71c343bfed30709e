"""GPT-MoE block specs built with Megatron's own spec functions, plugin modules swapped in.

The only edits to Megatron's spec are (a) ``MoESubmodules.router`` / ``.experts`` when a
plugin router or grouped-GEMM experts backend is selected, and (b) on the local spec with sequence
parallelism, the torch norms replaced by ``SequenceParallelTorchNorm``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_moe_reg.config import MODULE_BACKENDS
from megatron_moe_reg.experts.grouped_experts import GroupedGemmExperts
from megatron_moe_reg.integration.megatron import compat
from megatron_moe_reg.integration.megatron.norms import SequenceParallelTorchNorm


def _swap_torch_norm(norm_spec: Any) -> Any:
    return SequenceParallelTorchNorm if norm_spec is WrappedTorchNorm else norm_spec


def _patch_layer(layer_spec: Any, moe_changes: dict, swap_norms: bool, grouped_backend: str | None) -> Any:
    sub = layer_spec.submodules
    changes: dict[str, Any] = {}
    if (moe_changes or grouped_backend in MODULE_BACKENDS) and compat.is_moe_spec(sub.mlp):
        layer_changes = dict(moe_changes)
        if grouped_backend in MODULE_BACKENDS and "experts" not in layer_changes:
            layer_changes["experts"] = compat.replace_experts_class(
                compat.moe_submodules(sub.mlp).experts, SequentialMLP, GroupedGemmExperts, backend=grouped_backend
            )
        changes["mlp"] = compat.replace_moe_submodules(sub.mlp, **layer_changes)
    if swap_norms:
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            changes[name] = _swap_torch_norm(getattr(sub, name))
    if not changes:
        return layer_spec
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, **changes))


def patch_block_spec(
    spec: TransformerBlockSubmodules,
    config,
    use_transformer_engine: bool,
    *,
    router: Callable | None = None,
    experts: Any | None = None,
    grouped_backend: str | None = None,
) -> TransformerBlockSubmodules:
    """A Megatron GPT decoder block spec with plugin modules swapped into its MoE layers.

    ``router``: a ``MoESubmodules.router`` builder (None keeps Megatron's TopKRouter).
    ``experts``: a ``MoESubmodules.experts`` spec (None keeps Megatron's experts).
    ``grouped_backend``: ``triton`` or ``torch`` turns Megatron's SequentialMLP into
    ``GroupedGemmExperts`` with the same submodules; any other value (``sequential``, ``te``, None)
    keeps Megatron's experts.
    """
    moe_changes = {k: v for k, v in (("router", router), ("experts", experts)) if v is not None}
    swap_norms = config.sequence_parallel and not use_transformer_engine
    layers = [_patch_layer(ls, moe_changes, swap_norms, grouped_backend) for ls in spec.layer_specs]
    layer_norm = _swap_torch_norm(spec.layer_norm) if swap_norms else spec.layer_norm
    return dataclasses.replace(spec, layer_specs=layers, layer_norm=layer_norm)


def gpt_block_spec(
    config,
    use_transformer_engine: bool,
    *,
    router: Callable | None = None,
    experts: Any | None = None,
    grouped_backend: str | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """Megatron's GPT decoder block spec for this PP/VPP stage, with plugin modules swapped in
    (``patch_block_spec``)."""
    spec = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine,
        normalization=config.normalization,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    return patch_block_spec(
        spec, config, use_transformer_engine, router=router, experts=experts, grouped_backend=grouped_backend
    )
