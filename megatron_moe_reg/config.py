"""Options of the plugin itself (losses, routers, experts), validated in one place.

Each option is a flag of ``moe-reg pretrain`` (and of the Megatron-LM add-on entry). With every
coefficient at 0 the model trains exactly as Megatron's own; the regularizers' quantities are
still measured (without gradient) at each log interval, so baselines can be compared.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from megatron_moe_reg.errors import ConfigError

if TYPE_CHECKING:
    from megatron_moe_reg.training.arguments import RunConfig

COUPLING_VARIANTS = ("product", "log")
ROUTER_TYPES = ("topk", "spectral", "prototype", "ermoe", "emoe")
EIGEN_GATES = ("normalized", "softmax")
ORTHOGONALITY_WEIGHTS = ("fc1", "fc2")
GROUPED_GEMM_BACKENDS = ("auto", "triton", "torch", "te", "sequential")


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
    moe_weight_orthogonality_coeff: float = _opt(
        0.0, "lambda of the expert weight-orthogonality loss mean_{i!=j} cos^2(vec W_i, vec W_j) "
        "(baseline of arXiv 2601.00457; inferred form)")
    moe_weight_orthogonality_weights: str = _opt(
        "fc1", "which expert weights the orthogonality loss compares", choices=list(ORTHOGONALITY_WEIGHTS))
    moe_reg_measure: bool = _opt(
        True, "measure R_sp, R_cp, routing entropy, expert load, weight overlap and the router geometry "
        "(no gradient) at each log interval")
    moe_metrics_interval: int = _opt(
        0, "every N steps also measure PES and activation MSO of all experts on a token sample (0: never)")
    moe_metrics_sample_tokens: int = _opt(
        64, "positions of the step's first sequence on which every expert runs for PES / activation MSO")
    moe_grouped_gemm_backend: str = _opt(
        "sequential", "experts: Megatron's SequentialMLP (sequential), our Triton grouped GEMM (triton), "
        "torch._grouped_mm (torch), Megatron's TEGroupedMLP (te), or the fastest of triton, torch and "
        "sequential measured at this run's expert shape (auto); all share SequentialMLP's checkpoint layout",
        choices=list(GROUPED_GEMM_BACKENDS))
    moe_router_type: str = _opt(
        "topk", "router: Megatron's top-k, spectral-normalized, prototype (SR-MoE), eigenbasis (ERMoE) "
        "or shared eigenbasis (EMoE)", choices=list(ROUTER_TYPES))
    moe_router_spectral_penalty_coeff: float = _opt(
        0.0, "lambda_sn of the spectral penalty sigma_max(W)^2 on the routing matrix (SR-MoE; inferred form)")
    moe_router_spectral_target: Optional[float] = _opt(
        None, "use the hinge relu(sigma_max - c)^2 with this target c instead of sigma_max^2")
    moe_router_stable_rank_coeff: float = _opt(
        0.0, "lambda_sr of the stable-rank penalty 1/srank(W) = sigma_max^2/||W||_F^2 (SR-MoE; inferred form)")
    moe_router_spectral_gain: float = _opt(1.0, "initial gain g of the spectral router")
    moe_router_fixed_gain: bool = _opt(False, "keep the spectral router's gain constant")
    moe_prototype_temperature: float = _opt(1.0, "initial temperature tau of the prototype router")
    moe_prototype_fixed_temperature: bool = _opt(False, "keep the prototype router's temperature constant")
    moe_eigen_rank: int = _opt(16, "rank r of each expert's basis (ermoe) or of the shared basis (emoe)")
    moe_eigen_threshold: Optional[float] = _opt(
        None, "ermoe: report the share of routed slots whose eigenbasis score reaches this threshold")
    moe_eigen_gate: str = _opt("normalized", "ermoe gates: selected scores normalized, or softmax(score/T)",
                               choices=list(EIGEN_GATES))
    moe_eigen_temperature: float = _opt(1.0, "ermoe softmax-gate temperature T, emoe logit temperature tau")
    moe_emoe_ortho_coeff: float = _opt(0.0, "emoe soft orthonormality penalty on the basis parameter "
                                            "(authors' code: 1e-3)")

    @property
    def any_loss(self) -> bool:
        return (self.moe_specialization_loss_coeff > 0 or self.moe_coupling_loss_coeff > 0
                or self.moe_router_spectral_penalty_coeff > 0 or self.moe_router_stable_rank_coeff > 0
                or self.moe_emoe_ortho_coeff > 0 or self.moe_weight_orthogonality_coeff > 0)

    @property
    def any_enabled(self) -> bool:
        """Whether the plugin's modules are needed at all (losses, routers or measurements)."""
        return self.any_loss or self.moe_reg_measure or self.moe_router_type != "topk"

    def validate(self, run: "RunConfig | None" = None) -> None:
        """Check the plugin options against each other and against the run. Raises ConfigError."""
        for name in ("moe_specialization_loss_coeff", "moe_coupling_loss_coeff",
                     "moe_router_spectral_penalty_coeff", "moe_router_stable_rank_coeff", "moe_emoe_ortho_coeff",
                     "moe_weight_orthogonality_coeff"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"{_flag(name)} must be >= 0, got {value}")
        if self.moe_coupling_loss_variant not in COUPLING_VARIANTS:
            raise ConfigError(f"--moe-coupling-loss-variant must be one of {COUPLING_VARIANTS}")
        if self.moe_weight_orthogonality_weights not in ORTHOGONALITY_WEIGHTS:
            raise ConfigError(f"--moe-weight-orthogonality-weights must be one of {ORTHOGONALITY_WEIGHTS}")
        if self.moe_weight_orthogonality_weights != "fc1" and self.moe_weight_orthogonality_coeff == 0:
            raise ConfigError("--moe-weight-orthogonality-weights needs --moe-weight-orthogonality-coeff > 0")
        if self.moe_metrics_interval < 0:
            raise ConfigError(f"--moe-metrics-interval must be >= 0, got {self.moe_metrics_interval}")
        if self.moe_metrics_sample_tokens < 1:
            raise ConfigError(f"--moe-metrics-sample-tokens must be >= 1, got {self.moe_metrics_sample_tokens}")
        if self.moe_metrics_interval and not self.moe_reg_measure:
            raise ConfigError("--moe-metrics-interval needs the plugin's measurements; drop --no-moe-reg-measure")
        self._validate_router()
        if run is None:
            return
        moe, p = run.moe, run.parallel
        if not moe.num_experts and (self.any_loss or self.moe_specialization_include_shared_experts
                                    or self.moe_router_type != "topk"):
            raise ConfigError("the MoE regularization losses and routers need --num-experts")
        if not moe.num_experts:
            if self.moe_grouped_gemm_backend != "sequential":
                raise ConfigError("--moe-grouped-gemm-backend needs --num-experts")
            return
        self.validate_router_against_model(run)
        self.validate_experts_backend(run)
        num_moe_layers = sum(moe_layer_pattern(moe.moe_layer_freq, run.model.num_layers))
        if self.moe_metrics_interval and moe.num_experts < 2:
            raise ConfigError("--moe-metrics-interval compares pairs of experts; it needs --num-experts >= 2")
        if self.moe_weight_orthogonality_coeff > 0 and moe.num_experts < 2:
            raise ConfigError("--moe-weight-orthogonality-coeff compares pairs of experts; it needs "
                              "--num-experts >= 2")
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


    def _validate_router(self) -> None:
        kind = self.moe_router_type
        if kind not in ROUTER_TYPES:
            raise ConfigError(f"--moe-router-type must be one of {ROUTER_TYPES}, got {kind!r}")
        if self.moe_router_spectral_target is not None:
            if self.moe_router_spectral_penalty_coeff == 0:
                raise ConfigError("--moe-router-spectral-target needs --moe-router-spectral-penalty-coeff > 0")
            if self.moe_router_spectral_target <= 0:
                raise ConfigError("--moe-router-spectral-target must be > 0")
        owners = {  # option -> (router types it applies to, value meaning "not set")
            "moe_router_spectral_gain": (("spectral",), 1.0),
            "moe_router_fixed_gain": (("spectral",), False),
            "moe_prototype_temperature": (("prototype",), 1.0),
            "moe_prototype_fixed_temperature": (("prototype",), False),
            "moe_eigen_rank": (("ermoe", "emoe"), 16),
            "moe_eigen_threshold": (("ermoe",), None),
            "moe_eigen_gate": (("ermoe",), "normalized"),
            "moe_eigen_temperature": (("ermoe", "emoe"), 1.0),
            "moe_emoe_ortho_coeff": (("emoe",), 0.0),
        }
        for name, (kinds, unset) in owners.items():
            if getattr(self, name) != unset and kind not in kinds:
                raise ConfigError(f"{_flag(name)} applies to --moe-router-type {' or '.join(kinds)}, "
                                  f"not {kind}")
        for name in ("moe_router_spectral_gain", "moe_prototype_temperature", "moe_eigen_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.moe_eigen_threshold is not None and not 0.0 <= self.moe_eigen_threshold <= 1.0:
            raise ConfigError(f"--moe-eigen-threshold must be in [0, 1] (eigenbasis scores are cosines), "
                              f"got {self.moe_eigen_threshold}")

    def validate_experts_backend(self, run: "RunConfig") -> None:
        """The grouped-GEMM backends compute bias-free SwiGLU experts; te needs TE on a GPU."""
        from megatron_moe_reg.experts.functional import backend_unavailable_reason
        from megatron_moe_reg.experts.torch_backend import check_alignment

        backend = self.moe_grouped_gemm_backend
        if backend not in GROUPED_GEMM_BACKENDS:
            raise ConfigError(f"--moe-grouped-gemm-backend must be one of {GROUPED_GEMM_BACKENDS}, got {backend!r}")
        if backend in ("auto", "sequential"):
            return
        if run.moe.moe_grouped_gemm and backend != "te":
            raise ConfigError(f"--moe-grouped-gemm selects TEGroupedMLP, which conflicts with "
                              f"--moe-grouped-gemm-backend {backend}; drop one of them")
        if backend == "te":
            if run.model.transformer_impl == "local":
                raise ConfigError("--moe-grouped-gemm-backend te needs TransformerEngine layers; drop "
                                  "--transformer-impl local")
            return  # TE and GPU availability: checked with --transformer-impl when the model is built
        if not run.model.swiglu or run.model.add_bias_linear:
            raise ConfigError(f"--moe-grouped-gemm-backend {backend} computes bias-free SwiGLU experts; add "
                              "--swiglu and --disable-bias-linear, or use --moe-grouped-gemm-backend sequential")
        if "moe_act" in (run.parallel.recompute_modules or []):
            raise ConfigError(f"--recompute-modules moe_act recomputes SequentialMLP's activation, which "
                              f"--moe-grouped-gemm-backend {backend} computes inside its kernels; recompute "
                              "'moe' instead, or use --moe-grouped-gemm-backend sequential")
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        reason = backend_unavailable_reason(backend, device)
        if reason is not None:
            raise ConfigError(f"--moe-grouped-gemm-backend {backend}: {reason}; choose another backend")
        if backend == "torch":
            ffn = run.moe.moe_ffn_hidden_size // run.parallel.expert_tensor_parallel_size
            try:
                check_alignment(run.model.hidden_size, ffn, torch.bfloat16 if run.train.bf16 else torch.float32,
                                device.type)
            except ValueError as e:
                raise ConfigError(f"--moe-grouped-gemm-backend torch: {e}") from None

    def validate_router_against_model(self, run: "RunConfig") -> None:
        moe, m = run.moe, run.model
        kind = self.moe_router_type
        if kind in ("ermoe", "emoe") and not 1 <= self.moe_eigen_rank <= m.hidden_size:
            raise ConfigError(f"--moe-eigen-rank {self.moe_eigen_rank} must be between 1 and --hidden-size "
                              f"{m.hidden_size}")
        if kind in ("prototype", "ermoe", "emoe") and moe.moe_router_score_function != "softmax":
            raise ConfigError(f"--moe-router-type {kind} defines softmax routing; --moe-router-score-function "
                              f"{moe.moe_router_score_function} (and with it --moe-router-enable-expert-bias) "
                              "does not apply")
        if kind == "prototype" and moe.moe_z_loss_coeff:
            raise ConfigError("--moe-router-type prototype: its logits are negative squared distances whose "
                              "size carries the routing, so --moe-z-loss-coeff would fight it; drop the z-loss")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def moe_layer_pattern(moe_layer_freq, num_layers: int) -> list[int]:
    """0/1 per layer: Megatron's ``moe_layer_freq`` rule (int N: every N-th layer from the first)."""
    if isinstance(moe_layer_freq, int):
        return [1 if i % moe_layer_freq == 0 else 0 for i in range(num_layers)]
    return [int(v) for v in moe_layer_freq]
