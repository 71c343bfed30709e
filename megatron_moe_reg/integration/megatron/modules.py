"""Finding Megatron's modules inside a model: the GPTModel inside its wrappers, the MoE layers."""

from __future__ import annotations

from typing import Any

import torch


def unwrap(model_chunk: torch.nn.Module) -> Any:
    """The module inside DDP / Float16Module wrappers (the GPTModel of a chunk)."""
    inner: Any = model_chunk
    while hasattr(inner, "module"):
        inner = inner.module
    return inner


def moe_layers(chunk: torch.nn.Module) -> list[Any]:
    """The MoE layers of a model chunk, in layer order."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in chunk.modules() if isinstance(m, MoELayer)]
