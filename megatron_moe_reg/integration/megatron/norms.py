"""A torch norm usable with sequence parallelism in Megatron's local (non-TE) spec.

Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel``. Under sequence parallelism
each TP rank normalizes a different slice of the sequence, so the norm weight's gradient
is a partial sum over the TP group; Megatron's ``finalize_model_grads`` all-reduces the
gradients of every parameter tagged ``sequence_parallel=True`` over TP. This norm is
torch's RMSNorm/LayerNorm with that tag, the same contract as TE's and apex's norms.
"""

from __future__ import annotations

import torch


def mark_sequence_parallel(param: torch.Tensor, flag: bool) -> None:
    """Megatron's tag: ``finalize_model_grads`` all-reduces over TP the gradients of parameters
    whose ``sequence_parallel`` attribute is True (their ranks saw different tokens)."""
    setattr(param, "sequence_parallel", flag)  # noqa: B010  # an attribute torch's Tensor type does not declare


class SequenceParallelTorchNorm:
    """Drop-in for ``WrappedTorchNorm`` (same constructor) that supports sequence parallelism."""

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the torch norm")
        kind = config.normalization
        norm: torch.nn.Module
        if kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {kind!r} is not supported by the torch norm")
        for param in norm.parameters():
            mark_sequence_parallel(param, config.sequence_parallel)
        return norm
