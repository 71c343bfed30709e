"""Whether ``--moe-grouped-gemm-backend`` can run here: the device-dependent half of its checks
(the model-dependent half is ``PluginConfig.validate``); ``validate_plugin`` runs both."""

from __future__ import annotations

import torch

from megatron_moe_reg.config import ModelShape, PluginConfig
from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.experts.functional import backend_unavailable_reason
from megatron_moe_reg.experts.torch_backend import check_alignment


def check_backend_available(backend: str, shape: ModelShape) -> None:
    """Raise ConfigError when the triton or torch backend cannot run on this machine at this shape."""
    if not shape.num_experts or backend not in ("triton", "torch"):
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise ConfigError(f"--moe-grouped-gemm-backend {backend}: {reason}; choose another backend")
    if backend == "torch":
        assert shape.moe_ffn_hidden_size is not None  # filled by the drivers before validation
        ffn = shape.moe_ffn_hidden_size // shape.expert_tensor_parallel_size
        try:
            check_alignment(shape.hidden_size, ffn, torch.bfloat16 if shape.bf16 else torch.float32, device.type)
        except ValueError as e:
            raise ConfigError(f"--moe-grouped-gemm-backend torch: {e}") from None


def validate_plugin(plugin: PluginConfig, shape: ModelShape) -> None:
    """Every check of the plugin options: against each other and the model, then the experts backend
    on this machine. Both drivers call it before any work starts. Raises ConfigError."""
    plugin.validate(shape)
    check_backend_available(plugin.moe_grouped_gemm_backend, shape)
