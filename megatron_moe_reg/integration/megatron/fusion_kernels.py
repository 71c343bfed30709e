"""Megatron's fusions that need kernels PyTorch does not ship, and what provides each.

Megatron-LM turns every fusion on by default. Some need Apex's CUDA extensions or TransformerEngine;
without them megatron-core stops late and deep: in the attention's first bf16 softmax
(``import scaled_masked_softmax_cuda``), while building every ``ColumnParallelLinear``
(``fused_weight_gradient_mlp_cuda``), in the first RoPE (TransformerEngine's fused RoPE) or in
``WrappedTorchNorm`` (no persistent layer norm without Apex). Both drivers turn such a fusion off,
with a note, before anything is built: ``moe-reg pretrain`` and ``moe-reg megatron-lm``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelFusion:
    dest: str  # Megatron-LM's argument (``no_persist_layer_norm`` there is the negation of this one)
    flag: str  # Megatron-LM's flag that turns it off
    modules: tuple[str, ...]  # any one of them provides the kernels
    needs: str  # what to install, in words
    local_layers_only: bool = False  # only megatron-core's local layers use it (TE's bring their own)


KERNEL_FUSIONS = (
    KernelFusion("apply_rope_fusion", "--no-rope-fusion", ("transformer_engine",), "TransformerEngine"),
    KernelFusion("persist_layer_norm", "--no-persist-layer-norm", ("apex",), "Apex"),
    KernelFusion(
        "gradient_accumulation_fusion",
        "--no-gradient-accumulation-fusion",
        ("fused_weight_gradient_mlp_cuda",),
        "Apex's CUDA extensions (fused_weight_gradient_mlp_cuda)",
    ),
    KernelFusion(
        "masked_softmax_fusion",
        "--no-masked-softmax-fusion",
        ("scaled_masked_softmax_cuda",),
        "Apex's CUDA extensions (scaled_masked_softmax_cuda) or TransformerEngine layers",
        local_layers_only=True,
    ),
)


def importable(name: str) -> bool:
    """Whether a module can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fusions_without_kernels(te_layers: bool, can_import: Callable[[str], bool] = importable) -> list[KernelFusion]:
    """The fusions whose kernels this machine lacks, for TransformerEngine layers or local ones."""
    return [
        f
        for f in KERNEL_FUSIONS
        if not (te_layers and f.local_layers_only) and not any(can_import(m) for m in f.modules)
    ]
