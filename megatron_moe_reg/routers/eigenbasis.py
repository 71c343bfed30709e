"""Eigenbasis router of ERMoE (arXiv 2511.10971; paper description, ../shared/reference/papers.md §3).

Each expert e owns an orthonormal basis U_e ∈ R^{H×r} (``--moe-eigen-rank r``); a token's
eigenbasis score for e is the cosine between x and its projection on the expert's subspace:

    score_e(x) = ‖U_eᵀ x‖ / ‖x‖ ∈ [0, 1]

Routing takes the top-k scores. Gates: by default the selected scores normalized to sum 1, obtained
as Megatron's post-top-k softmax of logits log(score) (softmax(log s) over the selected = s / Σ s);
``--moe-eigen-gate softmax`` uses logits score / T (``--moe-eigen-temperature``) instead.
``--moe-eigen-threshold T``: the paper keeps experts whose score reaches T; Megatron's dispatchers
need exactly k experts per token, so when fewer than k reach T the highest-scoring others fill the
slots, which makes the selected set always the top-k. T is therefore reported, not applied: the share
of routed slots whose score reaches T is logged as ``eigen_qualified_fraction``.

Orthonormality: U_e = QR(A_e).Q with sign(diag R) fixed to +, from an unconstrained parameter A_e.
This is exact at every forward (error ~1e-7 in fp32), needs no optimizer hook and leaves A_e an
ordinary parameter for Megatron's optimizers, distributed optimizer and checkpoints; torch's
orthogonal parametrization would replace the parameter by a parametrization module that Megatron's
DDP buffers and sharded state dicts do not expect. (The ERMoE paper's own reparameterization of the
experts in their eigenbasis is not implemented.) The penalties act on the stacked bases (E·r x H).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_moe_reg.routers.base import PluginRouterMixin, own_random_stream, tag_router_parameter

TINY = 1e-20


def orthonormal_basis(A: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of A [..., H, r] with diag(R) >= 0: orthonormal columns, differentiable."""
    Q, R = torch.linalg.qr(A, mode="reduced")
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * sign.unsqueeze(-2)


def eigenbasis_scores(x_TH: torch.Tensor, bases_EHr: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """score[t, e] = ‖U_eᵀ x_t‖ / ‖x_t‖ (0 for a zero token), with one [T, H] x [H, E·r] matmul."""
    num_experts, hidden, rank = bases_EHr.shape
    proj = x_TH @ bases_EHr.permute(1, 0, 2).reshape(hidden, num_experts * rank)
    energy = proj.reshape(-1, num_experts, rank).norm(dim=-1)
    return (energy / x_TH.norm(dim=-1, keepdim=True).clamp_min(eps)).clamp(max=1.0)


class EigenbasisRouter(PluginRouterMixin, TopKRouter):
    def __init__(self, config, pg_collection=None, plugin=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        del self.weight  # the bases replace the linear gate
        rank = plugin.moe_eigen_rank
        raw = torch.empty(config.num_moe_experts, config.hidden_size, rank, dtype=torch.float32)
        with own_random_stream():
            for e in range(config.num_moe_experts):
                torch.nn.init.orthogonal_(raw[e])
        self.basis_raw = tag_router_parameter(torch.nn.Parameter(raw.to(config.params_dtype)), config)
        self._last_scores = None
        self._init_plugin(plugin)

    def bases(self) -> torch.Tensor:
        return orthonormal_basis(self.basis_raw.to(self._compute_dtype()))

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        x = input.to(self._compute_dtype())
        scores = eigenbasis_scores(x.reshape(-1, x.shape[-1]), self.bases())
        self._last_scores = scores.detach()
        if self.plugin.moe_eigen_gate == "softmax":
            logits = scores / self.plugin.moe_eigen_temperature
        else:
            logits = torch.log(scores.clamp_min(TINY))
        return logits.reshape(*x.shape[:-1], -1)

    def penalty_matrix(self) -> torch.Tensor:
        U = self.bases()  # [E, H, r] -> rows are the basis vectors of every expert
        return U.transpose(1, 2).reshape(-1, U.shape[1])

    def penalty_matrix_shape(self) -> tuple[int, int]:
        return self.config.num_moe_experts * self.plugin.moe_eigen_rank, self.config.hidden_size

    def orthonormality_error(self) -> torch.Tensor:
        U = self.bases()
        eye = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
        return (U.transpose(1, 2) @ U - eye).abs().max()

    def _record_geometry(self) -> None:
        super()._record_geometry()
        threshold = self.plugin.moe_eigen_threshold
        routing = self.moe_reg_last_routing
        tracker = self.tracker if self.moe_reg_measure else None
        # data-dependent: recorded for every micro-batch of a measured step
        if tracker is not None and threshold is not None and self._last_scores is not None and routing is not None:
            routed = routing.routing_map & routing.keep_mask()[:, None]
            qualified = (self._last_scores >= threshold) & routed
            fraction = qualified.sum() / routed.sum().clamp_min(1)
            tracker.record(
                "eigen_qualified_fraction",
                fraction,
                self.layer_number,
                self.config.num_layers,
                avg_group=self.tp_cp_group,
            )
