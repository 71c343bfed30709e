"""Shared-eigenbasis router of EMoE (arXiv 2601.12137; from the authors' public code, ``EigenRouter``
in Belis0811/EMoE moe_layers.py).

    Q ∈ R^{H×r} orthonormal (shared by all experts),  z = Qᵀ h
    e_r = z_r² / (Σ_r z_r² + 1e-6)                      energy per principal direction
    m   = softmax(M) over experts,  M ∈ R^{E×r} ~ N(0, 1)   soft ownership of each direction
    logit_e = Σ_r e_r γ_r m_{e,r} + b_e,   γ = 1, b = 0 at init
    then softmax(logits / τ) and top-k (``--moe-eigen-temperature`` τ, default 1 as the authors')

The authors take the top-k of the softmax over all experts without renormalizing; that is
Megatron's ``--moe-router-pre-softmax``. Megatron's default renormalizes over the top-k.
Orthonormality: the authors retract Q in place by QR at every training forward and add a soft
penalty λ‖QᵀQ - I‖_F². In-place edits of a parameter would diverge from the fp32 main copy kept
by Megatron's mixed-precision optimizers, so here Q = QR(A).Q of an unconstrained parameter A (exact
at every forward), and the optional soft penalty ``--moe-emoe-ortho-coeff`` λ‖AᵀA - I‖_F² keeps A
itself near orthonormal (well-conditioned QR). The router penalties act on the effective expert
directions (γ ⊙ m) Qᵀ (E x H; inferred).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_moe_reg.integration.megatron.aux_loss import attach_local_mean_loss
from megatron_moe_reg.routers.base import PluginRouterMixin, own_random_stream, tag_router_parameter
from megatron_moe_reg.routers.eigenbasis import orthonormal_basis


def emoe_logits(
    h_TH: torch.Tensor,
    Q_Hr: torch.Tensor,
    M_Er: torch.Tensor,
    gamma_r: torch.Tensor,
    b_E: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """EMoE's routing logits (already divided by τ), [T, E]."""
    z = h_TH @ Q_Hr
    energy = z.pow(2)
    energy = energy / (energy.sum(dim=-1, keepdim=True) + 1e-6)
    ownership = torch.softmax(M_Er, dim=0)
    return (energy @ (ownership * gamma_r).t() + b_E) / temperature


class EMoERouter(PluginRouterMixin, TopKRouter):
    def __init__(self, config, pg_collection=None, plugin=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        del self.weight  # the shared basis and ownership replace the linear gate
        rank, experts = plugin.moe_eigen_rank, config.num_moe_experts
        raw = torch.empty(config.hidden_size, rank, dtype=torch.float32)
        with own_random_stream():
            torch.nn.init.orthogonal_(raw)
            ownership = torch.randn(experts, rank)
        dtype = config.params_dtype
        self.basis_raw = tag_router_parameter(torch.nn.Parameter(raw.to(dtype)), config)
        self.ownership = tag_router_parameter(torch.nn.Parameter(ownership.to(dtype)), config)
        self.gamma = tag_router_parameter(torch.nn.Parameter(torch.ones(rank, dtype=dtype)), config)
        self.offset = tag_router_parameter(torch.nn.Parameter(torch.zeros(experts, dtype=dtype)), config)
        self._init_plugin(plugin)

    def basis(self) -> torch.Tensor:
        return orthonormal_basis(self.basis_raw.to(self._compute_dtype()))

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype()
        h = input.to(dtype)
        logits = emoe_logits(
            h.reshape(-1, h.shape[-1]),
            self.basis(),
            self.ownership.to(dtype),
            self.gamma.to(dtype),
            self.offset.to(dtype),
            self.plugin.moe_eigen_temperature,
        )
        return logits.reshape(*h.shape[:-1], -1)

    def penalty_matrix(self) -> torch.Tensor:
        dtype = self._compute_dtype()
        directions = torch.softmax(self.ownership.to(dtype), dim=0) * self.gamma.to(dtype)
        return directions @ self.basis().t()

    def penalty_matrix_rank(self) -> int | None:
        """The directions (γ ⊙ m) Qᵀ span at most the r columns of the shared basis Q."""
        return self.plugin.moe_eigen_rank

    def orthonormality_error(self) -> torch.Tensor:
        Q = self.basis()
        return (Q.t() @ Q - torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device)).abs().max()

    def _attach_penalties(self, probs, routing):
        probs = super()._attach_penalties(probs, routing)
        coeff = self.plugin.moe_emoe_ortho_coeff
        if coeff > 0:
            A = self.basis_raw.to(self._compute_dtype())
            soft = (A.t() @ A - torch.eye(A.shape[1], dtype=A.dtype, device=A.device)).pow(2).sum()
            probs = attach_local_mean_loss(
                probs,
                soft,
                coeff,
                tp_cp_size=self.tp_cp_group.size(),
                calculate_per_token_loss=self.calculate_per_token_loss,
                num_local_tokens=routing.keep_mask().sum(),
            )
        return probs
