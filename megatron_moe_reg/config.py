"""Options of the plugin itself (losses, routers, experts), validated in one place.

Each option is a flag of ``moe-reg pretrain`` (and of the Megatron-LM add-on entry). With every
coefficient at 0 the model trains exactly as Megatron's own; the regularizers' quantities are
still measured (without gradient) at each log interval, so baselines can be compared.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_moe_reg.errors import ConfigError

if TYPE_CHECKING:
    from megatron_moe_reg.training.arguments import RunConfig

COUPLING_VARIANTS = ("product", "log")


def _opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class PluginConfig:
    """Plugin options; all off by default, so the model is Megatron's own."""

    moe_specialization_loss_coeff: float = _opt(
        0.0, "lambda_sp of the intra-layer specialization loss R_sp (arXiv 2602.14159 Eq. 4); "
        "paper: 2e-3 (arXiv) or 2e-4 (ICLR version)")
    moe_specialization_include_shared_experts: bool = _opt(
        False, "include the shared expert's SwiGLU activation in R_sp's pairs (needs "
        "--moe-shared-expert-intermediate-size equal to --moe-ffn-hidden-size)")
    moe_coupling_loss_coeff: float = _opt(
        0.0, "lambda_cp of the cross-layer coupling loss R_cp (arXiv 2602.14159 Eq. 7, inferred form); "
        "paper: 1e-3 (arXiv) or 1e-4 (ICLR version)")
    moe_coupling_loss_variant: str = _opt(
        "product", "R_cp form: -mean(m_prev*m) or -mean(log(m_prev*m)), m = top-k routing mass",
        choices=list(COUPLING_VARIANTS))
    moe_reg_measure: bool = _opt(
        True, "measure R_sp and R_cp (no gradient) at each log interval when their coefficient is 0")

    @property
    def any_loss(self) -> bool:
        return self.moe_specialization_loss_coeff > 0 or self.moe_coupling_loss_coeff > 0

    @property
    def any_enabled(self) -> bool:
        """Whether the plugin's modules are needed at all (losses or measurements)."""
        return self.any_loss or self.moe_reg_measure

    def validate(self, run: "RunConfig | None" = None) -> None:
        """Check the plugin options against each other and against the run. Raises ConfigError."""
        for name in ("moe_specialization_loss_coeff", "moe_coupling_loss_coeff"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.moe_coupling_loss_variant not in COUPLING_VARIANTS:
            raise ConfigError(f"--moe-coupling-loss-variant must be one of {COUPLING_VARIANTS}")
        if run is None:
            return
        moe, p = run.moe, run.parallel
        if not moe.num_experts and (self.any_loss or self.moe_specialization_include_shared_experts):
            raise ConfigError("the MoE regularization losses need --num-experts")
        if not moe.num_experts:
            return
        num_moe_layers = sum(moe_layer_pattern(moe.moe_layer_freq, run.model.num_layers))
        if self.moe_coupling_loss_coeff > 0 and num_moe_layers < 2:
            raise ConfigError(f"--moe-coupling-loss-coeff needs at least two MoE layers, this model has "
                              f"{num_moe_layers}; add MoE layers (--num-layers, --moe-layer-freq) or set it to 0")
        if self.moe_specialization_loss_coeff > 0 and moe.moe_router_topk == 1 \
                and not self.moe_specialization_include_shared_experts:
            warnings.warn("--moe-specialization-loss-coeff with --moe-router-topk 1: each token has one "
                          "routed expert, so R_sp has no pairs and is identically 0", stacklevel=2)
        if self.moe_specialization_include_shared_experts:
            shared = moe.moe_shared_expert_intermediate_size
            if shared is None:
                raise ConfigError("--moe-specialization-include-shared-experts needs shared experts "
                                  "(--moe-shared-expert-intermediate-size)")
            if shared != moe.moe_ffn_hidden_size:
                raise ConfigError(f"--moe-specialization-include-shared-experts compares activations of equal "
                                  f"width, but --moe-shared-expert-intermediate-size {shared} != "
                                  f"--moe-ffn-hidden-size {moe.moe_ffn_hidden_size}")
            if p.expert_tensor_parallel_size != p.tensor_model_parallel_size:
                raise ConfigError("--moe-specialization-include-shared-experts needs "
                                  "--expert-tensor-parallel-size equal to --tensor-model-parallel-size")
            if p.recompute_modules and "shared_experts" in p.recompute_modules:
                raise ConfigError("--moe-specialization-include-shared-experts cannot read the shared expert "
                                  "under --recompute-modules shared_experts; recompute 'moe' instead")


def moe_layer_pattern(moe_layer_freq, num_layers: int) -> list[int]:
    """0/1 per layer: Megatron's ``moe_layer_freq`` rule (int N: every N-th layer from the first)."""
    if isinstance(moe_layer_freq, int):
        return [1 if i % moe_layer_freq == 0 else 0 for i in range(num_layers)]
    return [int(v) for v in moe_layer_freq]
