"""Options of the plugin itself (losses, routers, experts), validated in one place.

Each option is a flag of ``moe-reg pretrain`` (and of the Megatron-LM add-on entry). With every
coefficient at 0 the model trains exactly as Megatron's own; the regularizers' quantities are
still measured (without gradient) at each log interval, so baselines can be compared.

A leaf module: no torch, no Megatron. The checks that need the model read a ``ModelShape``, which
``RunConfig.model_shape()`` and the Megatron-LM add-on (from its argument namespace) both build;
the device-dependent check of a grouped-GEMM backend is ``experts.validation``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.flags import flag_name as _flag
from megatron_moe_reg.flags import opt as _opt
from megatron_moe_reg.flags import reject_non_finite

COUPLING_VARIANTS = ("product", "log")
ROUTER_TYPES = ("topk", "spectral", "prototype", "ermoe", "emoe")
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")  # Megatron's --moe-router-score-function
AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")  # balancing types with a loss on the scores
EIGEN_GATES = ("normalized", "softmax")
ORTHOGONALITY_WEIGHTS = ("fc1", "fc2")
GRAM_KERNELS = ("auto", "torch", "triton")  # R_sp's per-token Gram (losses.specialization_rows)
GROUPED_GEMM_BACKENDS = ("auto", "triton", "torch", "te", "sequential")
MODULE_BACKENDS = ("triton", "torch")  # the backends the plugin's GroupedGemmExperts runs


def coefficient(default: float, help: str) -> Any:
    """A loss coefficient: >= 0, any one > 0 turns the plugin's losses on (``coefficient_fields``)."""
    return _opt(default, help, coefficient=True)


def router_option(default: Any, help: str, routers: tuple[str, ...], **meta: Any) -> Any:
    """An option of some router types only: any value but its default needs one of ``routers``."""
    return _opt(default, help, routers=routers, **meta)


def _largest(value: float | list[float] | None) -> float:
    """A coefficient flag that Megatron-LM also accepts as a list (one per balancing type)."""
    if isinstance(value, (list, tuple)):
        return max(value, default=0.0)
    return value or 0.0


def _as_tuple(value: str | list[str]) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclass(frozen=True)
class ModelShape:
    """What the plugin's checks need to know of the model and its parallel layout."""

    num_layers: int
    hidden_size: int
    num_experts: int | None
    moe_router_topk: int
    moe_ffn_hidden_size: int | None
    moe_layer_freq: int | list[int]
    moe_shared_expert_intermediate_size: int | None
    moe_router_score_function: str
    moe_z_loss_coeff: float | None
    moe_aux_loss_coeff: float  # the largest of Megatron-LM's per-type coefficients
    moe_router_load_balancing_type: tuple[str, ...]  # one or more (Megatron-LM takes a list)
    moe_grouped_gemm: bool
    swiglu: bool
    add_bias_linear: bool
    transformer_impl: str
    bf16: bool
    tensor_model_parallel_size: int
    expert_model_parallel_size: int
    expert_tensor_parallel_size: int
    context_parallel_size: int
    recompute_modules: tuple[str, ...]
    micro_batch_size: int
    seq_length: int

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> ModelShape:
        """From option values named as Megatron-LM's flags: a ``RunConfig``'s groups or a Megatron-LM
        argument namespace (``vars(args)``). Unset derived sizes take Megatron-LM's defaults."""
        names = [f.name for f in dataclasses.fields(cls)]
        shape = {name: values[name] for name in names}
        tp = values["tensor_model_parallel_size"]
        shape.update(
            moe_ffn_hidden_size=values["moe_ffn_hidden_size"] or values["ffn_hidden_size"],
            expert_tensor_parallel_size=values["expert_tensor_parallel_size"] or tp,
            recompute_modules=tuple(values["recompute_modules"] or ()),
            moe_grouped_gemm=bool(values["moe_grouped_gemm"]),
            moe_aux_loss_coeff=_largest(values["moe_aux_loss_coeff"]),
            moe_router_load_balancing_type=_as_tuple(values["moe_router_load_balancing_type"]),
        )
        return cls(**shape)

    @property
    def num_moe_layers(self) -> int:
        return sum(moe_layer_pattern(self.moe_layer_freq, self.num_layers)) if self.num_experts else 0


@dataclass
class PluginConfig:
    """Plugin options; all off by default, so the model is Megatron's own."""

    moe_specialization_loss_coeff: float = coefficient(
        0.0,
        "lambda_sp of the intra-layer specialization loss R_sp (arXiv 2602.14159 Eq. 4); "
        "paper: 2e-3 (arXiv) or 2e-4 (ICLR version)",
    )
    moe_specialization_include_shared_experts: bool = _opt(
        False,
        "include the shared expert's SwiGLU activation in R_sp's pairs (needs "
        "--moe-shared-expert-intermediate-size equal to --moe-ffn-hidden-size)",
    )
    moe_specialization_max_tokens: int = _opt(
        0,
        "R_sp over at most N evenly spaced tokens of each micro-batch and layer (the same tokens on "
        "every parallel layout; only their rows travel back under expert parallelism); 0: every token. "
        "Bias: the loss and its gradient see only those positions of the sequence",
    )
    moe_specialization_gram_kernel: str = _opt(
        "auto",
        "R_sp's per-token Gram: fused Triton kernels, or torch's batched matmuls (auto: Triton on a GPU)",
        choices=list(GRAM_KERNELS),
    )
    moe_coupling_loss_coeff: float = coefficient(
        0.0,
        "lambda_cp of the cross-layer coupling loss R_cp (arXiv 2602.14159 Eq. 7, inferred form); "
        "paper: 1e-3 (arXiv) or 1e-4 (ICLR version)",
    )
    moe_coupling_loss_variant: str = _opt(
        "product",
        "R_cp form: -mean(m_prev*m) or -mean(log(m_prev*m)), m = top-k routing mass",
        choices=list(COUPLING_VARIANTS),
    )
    moe_weight_orthogonality_coeff: float = coefficient(
        0.0,
        "lambda of the expert weight-orthogonality loss mean_{i!=j} cos^2(vec W_i, vec W_j) "
        "(baseline of arXiv 2601.00457; inferred form)",
    )
    moe_weight_orthogonality_weights: str = _opt(
        "fc1", "which expert weights the orthogonality loss compares", choices=list(ORTHOGONALITY_WEIGHTS)
    )
    moe_reg_measure: bool = _opt(
        True,
        "measure R_sp, R_cp, routing entropy, expert load, weight overlap and the router geometry "
        "(no gradient) at each log interval",
    )
    moe_metrics_interval: int = _opt(
        0, "every N steps also measure PES and activation MSO of all experts on a token sample (0: never)"
    )
    moe_metrics_sample_tokens: int = _opt(
        64, "positions of the step's first sequence on which every expert runs for PES / activation MSO"
    )
    moe_grouped_gemm_backend: str = _opt(
        "sequential",
        "experts: Megatron's SequentialMLP (sequential), our Triton grouped GEMM (triton), "
        "torch._grouped_mm (torch), Megatron's TEGroupedMLP (te), or the fastest of triton, torch and "
        "sequential measured at this run's expert shape (auto); all share SequentialMLP's checkpoint layout",
        choices=list(GROUPED_GEMM_BACKENDS),
    )
    moe_router_type: str = _opt(
        "topk",
        "router: Megatron's top-k, spectral-normalized, prototype (SR-MoE), eigenbasis (ERMoE) "
        "or shared eigenbasis (EMoE)",
        choices=list(ROUTER_TYPES),
    )
    moe_router_spectral_penalty_coeff: float = coefficient(
        0.0, "lambda_sn of the spectral penalty sigma_max(W)^2 on the routing matrix (SR-MoE; inferred form)"
    )
    moe_router_spectral_target: float | None = _opt(
        None, "use the hinge relu(sigma_max - c)^2 with this target c instead of sigma_max^2"
    )
    moe_router_exact_score_normalization: bool = _opt(
        False,
        "normalize sigmoid / sqrtsoftplus scores for Megatron's load-balancing losses in log space, "
        "without the 1e-20 epsilon that lets a router lower the loss by shrinking all its scores "
        "(Megatron-LM #1545)",
    )
    moe_router_stable_rank_coeff: float = coefficient(
        0.0, "lambda_sr of the stable-rank penalty 1/srank(W) = sigma_max^2/||W||_F^2 (SR-MoE; inferred form)"
    )
    moe_router_spectral_gain: float = router_option(1.0, "initial gain g of the spectral router", ("spectral",))
    moe_router_fixed_gain: bool = router_option(False, "keep the spectral router's gain constant", ("spectral",))
    moe_prototype_temperature: float = router_option(
        1.0, "initial temperature tau of the prototype router", ("prototype",)
    )
    moe_prototype_fixed_temperature: bool = router_option(
        False, "keep the prototype router's temperature constant", ("prototype",)
    )
    moe_eigen_rank: int = router_option(
        16, "rank r of each expert's basis (ermoe) or of the shared basis (emoe)", ("ermoe", "emoe")
    )
    moe_eigen_threshold: float | None = router_option(
        None, "ermoe: report the share of routed slots whose eigenbasis score reaches this threshold", ("ermoe",)
    )
    moe_eigen_gate: str = router_option(
        "normalized",
        "ermoe gates: selected scores normalized, or softmax(score/T)",
        ("ermoe",),
        choices=list(EIGEN_GATES),
    )
    moe_eigen_temperature: float = router_option(
        1.0, "ermoe softmax-gate temperature T, emoe logit temperature tau", ("ermoe", "emoe")
    )
    moe_emoe_ortho_coeff: float = router_option(
        0.0,
        "emoe soft orthonormality penalty on the basis parameter (authors' code: 1e-3)",
        ("emoe",),
        coefficient=True,
    )

    @property
    def any_loss(self) -> bool:
        return any(getattr(self, name) > 0 for name in coefficient_fields(self))

    @property
    def any_enabled(self) -> bool:
        """Whether the plugin's modules are needed at all (losses, routers or measurements)."""
        return (
            self.any_loss
            or self.moe_reg_measure
            or self.moe_router_type != "topk"
            or self.moe_router_exact_score_normalization
        )

    def validate(self, shape: ModelShape | None = None) -> None:
        """Check the plugin options against each other and against the model. Raises ConfigError."""
        reject_non_finite(self)
        for name in coefficient_fields(self):
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
        if shape is not None:
            self._validate_against(shape)

    def _validate_against(self, shape: ModelShape) -> None:
        if not shape.num_experts and (
            self.any_loss or self.moe_specialization_include_shared_experts or self.moe_router_type != "topk"
        ):
            raise ConfigError("the MoE regularization losses and routers need --num-experts")
        if not shape.num_experts:
            if self.moe_grouped_gemm_backend != "sequential":
                raise ConfigError("--moe-grouped-gemm-backend needs --num-experts")
            return
        self._validate_router_against(shape)
        self._validate_experts_backend(shape)
        if self.moe_router_exact_score_normalization:
            self._validate_exact_scores(shape)
        if self.moe_metrics_interval and shape.num_experts < 2:
            raise ConfigError("--moe-metrics-interval compares pairs of experts; it needs --num-experts >= 2")
        if self.moe_weight_orthogonality_coeff > 0 and shape.num_experts < 2:
            raise ConfigError("--moe-weight-orthogonality-coeff compares pairs of experts; it needs --num-experts >= 2")
        if self.moe_coupling_loss_coeff > 0 and shape.num_moe_layers < 2:
            raise ConfigError(
                f"--moe-coupling-loss-coeff needs at least two MoE layers, this model has "
                f"{shape.num_moe_layers}; add MoE layers (--num-layers, --moe-layer-freq) or set it to 0"
            )
        if (
            self.moe_specialization_loss_coeff > 0
            and shape.moe_router_topk == 1
            and not self.moe_specialization_include_shared_experts
        ):
            warnings.warn(
                "--moe-specialization-loss-coeff with --moe-router-topk 1: each token has one "
                "routed expert, so R_sp has no pairs and is identically 0",
                stacklevel=3,
            )
        if self.moe_specialization_max_tokens < 0:
            raise ConfigError(
                "--moe-specialization-max-tokens must be >= 0 (0: every token), "
                f"got {self.moe_specialization_max_tokens}"
            )
        if self.moe_specialization_gram_kernel == "triton":
            self._validate_gram_kernel()
        if self.moe_specialization_include_shared_experts:
            self._validate_shared_experts(shape)

    @staticmethod
    def _validate_exact_scores(shape: ModelShape) -> None:
        flag = "--moe-router-exact-score-normalization"
        if shape.moe_router_score_function == "softmax":
            raise ConfigError(
                f"{flag} changes sigmoid and sqrtsoftplus scores; softmax scores need no normalization "
                "(set --moe-router-score-function sigmoid, or drop the flag)"
            )
        if shape.moe_aux_loss_coeff <= 0:
            raise ConfigError(
                f"{flag} changes the scores of the load-balancing losses, which are off "
                "(--moe-aux-loss-coeff 0); set a coefficient or drop the flag"
            )
        if not set(shape.moe_router_load_balancing_type) & set(AUX_LOSS_TYPES):
            raise ConfigError(
                f"{flag} changes the scores of the load-balancing losses, which "
                f"--moe-router-load-balancing-type {' '.join(shape.moe_router_load_balancing_type)} does not use; "
                f"choose one of {', '.join(AUX_LOSS_TYPES)}, or drop the flag"
            )

    def _validate_gram_kernel(self) -> None:
        import importlib.util
        import os

        if importlib.util.find_spec("triton") is None:
            raise ConfigError("--moe-specialization-gram-kernel triton needs triton (pip install triton), or use auto")
        if os.environ.get("TRITON_INTERPRET") != "1":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    "--moe-specialization-gram-kernel triton needs a GPU (or TRITON_INTERPRET=1); use auto"
                )

    def _validate_shared_experts(self, shape: ModelShape) -> None:
        shared = shape.moe_shared_expert_intermediate_size
        if shared is None:
            raise ConfigError(
                "--moe-specialization-include-shared-experts needs shared experts "
                "(--moe-shared-expert-intermediate-size)"
            )
        if shared != shape.moe_ffn_hidden_size:
            raise ConfigError(
                f"--moe-specialization-include-shared-experts compares activations of equal "
                f"width, but --moe-shared-expert-intermediate-size {shared} != "
                f"--moe-ffn-hidden-size {shape.moe_ffn_hidden_size}"
            )
        if shape.expert_tensor_parallel_size != shape.tensor_model_parallel_size:
            raise ConfigError(
                "--moe-specialization-include-shared-experts needs "
                "--expert-tensor-parallel-size equal to --tensor-model-parallel-size"
            )
        if "shared_experts" in shape.recompute_modules:
            raise ConfigError(
                "--moe-specialization-include-shared-experts cannot read the shared expert "
                "under --recompute-modules shared_experts; recompute 'moe' instead"
            )

    def _validate_router(self) -> None:
        kind = self.moe_router_type
        if kind not in ROUTER_TYPES:
            raise ConfigError(f"--moe-router-type must be one of {ROUTER_TYPES}, got {kind!r}")
        if self.moe_router_spectral_target is not None:
            if self.moe_router_spectral_penalty_coeff == 0:
                raise ConfigError("--moe-router-spectral-target needs --moe-router-spectral-penalty-coeff > 0")
            if self.moe_router_spectral_target <= 0:
                raise ConfigError("--moe-router-spectral-target must be > 0")
        for f in dataclasses.fields(self):
            kinds = f.metadata.get("routers")
            if kinds and getattr(self, f.name) != f.default and kind not in kinds:
                raise ConfigError(f"{_flag(f.name)} applies to --moe-router-type {' or '.join(kinds)}, not {kind}")
        for name in ("moe_router_spectral_gain", "moe_prototype_temperature", "moe_eigen_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.moe_eigen_threshold is not None and not 0.0 <= self.moe_eigen_threshold <= 1.0:
            raise ConfigError(
                f"--moe-eigen-threshold must be in [0, 1] (eigenbasis scores are cosines), "
                f"got {self.moe_eigen_threshold}"
            )

    def _validate_experts_backend(self, shape: ModelShape) -> None:
        """The grouped-GEMM backends compute bias-free SwiGLU experts; te needs TE layers. Whether a
        backend runs on this device is ``experts.validation.check_backend_available``."""
        backend = self.moe_grouped_gemm_backend
        if backend not in GROUPED_GEMM_BACKENDS:
            raise ConfigError(f"--moe-grouped-gemm-backend must be one of {GROUPED_GEMM_BACKENDS}, got {backend!r}")
        if backend in ("auto", "sequential"):
            return
        if shape.moe_grouped_gemm and backend != "te":
            raise ConfigError(
                f"--moe-grouped-gemm selects TEGroupedMLP, which conflicts with "
                f"--moe-grouped-gemm-backend {backend}; drop one of them"
            )
        if backend == "te":
            if shape.transformer_impl == "local":
                raise ConfigError(
                    "--moe-grouped-gemm-backend te needs TransformerEngine layers; drop --transformer-impl local"
                )
            return  # TE and GPU availability: checked with --transformer-impl when the model is built
        if not shape.swiglu or shape.add_bias_linear:
            raise ConfigError(
                f"--moe-grouped-gemm-backend {backend} computes bias-free SwiGLU experts; add "
                "--swiglu and --disable-bias-linear, or use --moe-grouped-gemm-backend sequential"
            )
        if "moe_act" in shape.recompute_modules:
            raise ConfigError(
                f"--recompute-modules moe_act recomputes SequentialMLP's activation, which "
                f"--moe-grouped-gemm-backend {backend} computes inside its kernels; recompute "
                "'moe' instead, or use --moe-grouped-gemm-backend sequential"
            )

    def _validate_router_against(self, shape: ModelShape) -> None:
        kind = self.moe_router_type
        if kind in ("ermoe", "emoe") and not 1 <= self.moe_eigen_rank <= shape.hidden_size:
            raise ConfigError(
                f"--moe-eigen-rank {self.moe_eigen_rank} must be between 1 and --hidden-size {shape.hidden_size}"
            )
        if kind in ("prototype", "ermoe", "emoe") and shape.moe_router_score_function != "softmax":
            raise ConfigError(
                f"--moe-router-type {kind} defines softmax routing; --moe-router-score-function "
                f"{shape.moe_router_score_function} (and with it --moe-router-enable-expert-bias) "
                "does not apply"
            )
        if kind == "prototype" and shape.moe_z_loss_coeff:
            raise ConfigError(
                "--moe-router-type prototype: its logits are negative squared distances whose "
                "size carries the routing, so --moe-z-loss-coeff would fight it; drop the z-loss"
            )


def coefficient_fields(plugin: PluginConfig) -> tuple[str, ...]:
    """The loss coefficients of a plugin configuration (its class's fields marked ``coefficient``)."""
    return tuple(f.name for f in dataclasses.fields(plugin) if f.metadata.get("coefficient"))


def moe_layer_pattern(moe_layer_freq: int | list[int], num_layers: int) -> list[int]:
    """0/1 per layer: Megatron's ``moe_layer_freq`` rule (int N: every N-th layer from the first)."""
    if isinstance(moe_layer_freq, int):
        return [1 if i % moe_layer_freq == 0 else 0 for i in range(num_layers)]
    return [int(v) for v in moe_layer_freq]
