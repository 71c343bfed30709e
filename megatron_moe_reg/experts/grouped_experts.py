"""``GroupedGemmExperts``: Megatron's SequentialMLP with all local experts computed in one grouped call.

It subclasses ``SequentialMLP`` and keeps everything but the forward: the same per-expert
``local_experts.{i}.linear_fc1/linear_fc2`` parameters (so DDP, the optimizer, the state dict and
``sharded_state_dict`` with global expert indices are Megatron's own, and a checkpoint moves
between this backend, SequentialMLP and other EP sizes), the same initialization and the same
expert-tensor-parallel slicing (each rank runs its F/etp slice; the dispatcher reduces fc2's
partial sums, as with SequentialMLP). The forward is ``experts.grouped_mlp_with_activation``:

    y = (p ⊙ silu(x W_gateᵀ) ⊙ (x W_upᵀ)) W2ᵀ     per expert, rows sorted by expert

and the SwiGLU activation z (before p) is handed to registered activation hooks, which the
specialization loss uses instead of recomputing it from fc1's output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_moe_reg.experts.functional import grouped_mlp_with_activation


class _HookHandle:
    def __init__(self, hooks: list, fn: Callable):
        self.hooks, self.fn = hooks, fn

    def remove(self) -> None:
        if self.fn in self.hooks:
            self.hooks.remove(self.fn)


def check_supported(config) -> None:
    """The grouped kernels compute bias-free SwiGLU experts in the activation dtype."""
    unsupported = {
        "gated_linear_unit=False": not config.gated_linear_unit,
        "an activation other than silu": config.activation_func is not F.silu,
        "biases (add_bias_linear)": config.add_bias_linear,
        "fp8/fp4": bool(getattr(config, "fp8", None) or getattr(config, "fp4", None)),
        "glu_linear_offset": bool(getattr(config, "glu_linear_offset", 0.0)),
        "activation_func_clamp_value": getattr(config, "activation_func_clamp_value", None) is not None,
        "delay_wgrad_compute": bool(getattr(config, "delay_wgrad_compute", False)),
    }
    found = [name for name, bad in unsupported.items() if bad]
    if found:
        raise ValueError(
            f"grouped GEMM experts do not support {', '.join(found)}; use Megatron's "
            "SequentialMLP (--moe-grouped-gemm-backend sequential)"
        )


class GroupedGemmExperts(SequentialMLP):
    """SequentialMLP's parameters and checkpoints, grouped-GEMM forward (backend: triton|torch)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, *, backend: str, **kwargs):
        check_supported(config)
        super().__init__(num_local_experts, config, submodules, pg_collection, **kwargs)
        self.backend = backend
        self._activation_hooks: list[Callable] = []
        fc1 = self.local_experts[0].linear_fc1
        if self.tp_group.size() > 1 and not getattr(fc1, "explicit_expert_comm", True):
            raise ValueError(
                "grouped GEMM experts need the token dispatcher to handle expert-tensor "
                "parallelism (tensor or expert parallel size > 1)"
            )

    def register_activation_hook(self, fn: Callable[[torch.nn.Module, torch.Tensor], None]) -> _HookHandle:
        """Call ``fn(self, z)`` after each forward with the SwiGLU activation z [rows, F/etp]."""
        self._activation_hooks.append(fn)
        return _HookHandle(self._activation_hooks, fn)

    def forward(
        self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
    ):
        hidden = permuted_local_hidden_states
        probs: torch.Tensor | None = permuted_probs
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP: scale the input, then p = 1
            hidden = (permuted_probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            probs = None
        output, z = grouped_mlp_with_activation(
            hidden,
            tokens_per_expert,
            [e.linear_fc1.weight for e in self.local_experts],
            [e.linear_fc2.weight for e in self.local_experts],
            probs,
            backend=self.backend,
        )
        for hook in list(self._activation_hooks):
            hook(self, z)
        return output, None
