"""The plugin's base for routers: Megatron's ``TopKRouter`` with observable routing and penalties.

``PluginRouterMixin.routing`` runs the router's routing (Megatron's, unchanged: z-loss, top-k with
any score function, expert bias, group-limited routing, capacity, aux losses), then

- keeps this forward's routing map for the specialization loss;
- attaches the SR-MoE router penalties (``losses.router_penalties``) on ``penalty_matrix()``;
- records the router geometry (``metrics.geometry``: σ_max, stable rank, row orthogonality and
  conditioning of ``penalty_matrix()``; orthonormality error for eigenbasis routers) and the
  routing entropy on measured steps, and adds every step's expert load to the installed
  ``RoutingStats``;
- lets the installed observers (the coupling loss) attach their losses;
- with ``--moe-router-exact-score-normalization``, gives Megatron's load-balancing losses sigmoid /
  sqrtsoftplus scores normalized in log space (``integration.megatron.aux_loss.exact_aux_loss_scores``),
  and with any non-softmax score function records on measured steps the share of the score mass
  that Megatron's s / (Σs + 1e-20) drops (``metrics.routing.aux_score_mass_lost``).

σ_max for penalties and the spectral router comes from power iteration with persistent
``power_u``/``power_v`` buffers (fp32, checkpointed), advanced once per optimizer step (the
step id set by ``Regularizers.begin_step``): every micro-batch and every recompute pass of a
step sees the same σ, so values do not depend on the micro-batch count or on recompute.
Routers that need no σ keep exactly Megatron's state dict.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from megatron_moe_reg.integration.megatron import patches
from megatron_moe_reg.integration.megatron.aux_loss import attach_local_mean_loss, exact_aux_loss_scores
from megatron_moe_reg.integration.megatron.norms import mark_sequence_parallel
from megatron_moe_reg.losses.router_penalties import (
    sigma_from_vectors,
    spectral_penalty,
    stable_rank_penalty,
    top_singular_vectors,
)
from megatron_moe_reg.metrics.geometry import geometry_tensors
from megatron_moe_reg.metrics.routing import aux_score_mass_lost, router_distribution, routing_entropy


@dataclass
class RoutingRecord:
    """One forward's routing on this rank (its sequence-parallel shard of the micro-batch)."""

    routing_map: torch.Tensor  # [T, E] bool
    padding_mask: torch.Tensor | None  # [T] bool, True = padding (Megatron's router convention)

    @property
    def num_tokens(self) -> int:
        return self.routing_map.shape[0]

    def keep_mask(self) -> torch.Tensor:
        if self.padding_mask is None:
            return torch.ones(self.num_tokens, dtype=torch.bool, device=self.routing_map.device)
        return ~self.padding_mask.reshape(-1).to(torch.bool)


def own_random_stream():
    """Draws for a router's own parameters from a fork of the CPU generator, which is restored
    afterwards: every other parameter of the model gets the values it gets with the top-k router
    and the same seed, so router variants of a study differ only in the router."""
    return torch.random.fork_rng(devices=[])


def tag_router_parameter(param: torch.nn.Parameter, config) -> torch.nn.Parameter:
    """New router parameters are replicated over TP: their gradients are summed over TP like the
    router weight's (Megatron's ``sequence_parallel`` attribute)."""
    mark_sequence_parallel(param, config.sequence_parallel)
    return param


if TYPE_CHECKING:  # the mixin is always combined with Megatron's TopKRouter (or a subclass)
    from megatron.core.transformer.moe.router import TopKRouter as _RouterBase
else:
    _RouterBase = object


class PluginRouterMixin(_RouterBase):
    """Mix in before a ``TopKRouter`` (sub)class; call ``_init_plugin(plugin)`` in ``__init__``."""

    moe_reg_observers: tuple = ()
    moe_reg_last_routing: RoutingRecord | None = None
    moe_reg_step: int | None = None  # the optimizer step being run
    moe_reg_measure: bool = False
    tracker = None
    moe_reg_stats = None  # RoutingStats when measurements are on
    needs_sigma: bool = False  # a router whose logits use σ (spectral)

    def _init_plugin(self, plugin) -> None:
        self.plugin = plugin
        self._power_step: int | None = -1
        self._measured_step: int | None = -1
        if self.needs_sigma or self.penalties_enabled:
            rows, cols = self.penalty_matrix_shape()
            u = torch.randn(rows, generator=torch.Generator().manual_seed(20260115), dtype=torch.float32)
            v = torch.randn(cols, generator=torch.Generator().manual_seed(20260116), dtype=torch.float32)
            self.register_buffer("power_u", F.normalize(u, dim=0))
            self.register_buffer("power_v", F.normalize(v, dim=0))

    def _register_scalar(self, name: str, value: float, fixed: bool) -> None:
        """A learnable scalar parameter (tagged for TP reduction), or a constant buffer when ``fixed``."""
        tensor = torch.full((1,), float(value), dtype=torch.float32)
        if fixed:
            self.register_buffer(name, tensor)
        else:
            setattr(self, name, tag_router_parameter(torch.nn.Parameter(tensor), self.config))

    @property
    def penalties_enabled(self) -> bool:
        p = getattr(self, "plugin", None)
        return p is not None and (p.moe_router_spectral_penalty_coeff > 0 or p.moe_router_stable_rank_coeff > 0)

    # -------------------------------------------------------------- geometry
    def penalty_matrix(self) -> torch.Tensor:
        """The routing matrix the penalties act on (E x H for the linear routers)."""
        return self.weight

    def penalty_matrix_shape(self) -> tuple[int, int]:
        return self.config.num_moe_experts, self.config.hidden_size

    def penalty_matrix_rank(self) -> int | None:
        """The routing matrix's structural rank when below min(shape) (None: not below)."""
        return None

    def _compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32

    def router_sigma(self) -> torch.Tensor:
        """σ_max of ``penalty_matrix()``, differentiable (top singular vectors found once per step)."""
        W = self.penalty_matrix().to(self._compute_dtype())
        for name in ("power_u", "power_v"):  # Float16Module casts buffers; keep them fp32
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        if self.training and (self.moe_reg_step is None or self.moe_reg_step != self._power_step):
            u, v = top_singular_vectors(W, self.power_u)
            self.power_u.copy_(u)
            self.power_v.copy_(v)
            self._power_step = self.moe_reg_step
        # copies: the buffers are updated in place on the next step, after this graph may be kept
        return sigma_from_vectors(W, self.power_u.clone(), self.power_v.clone())

    def orthonormality_error(self) -> torch.Tensor | None:
        """max |UᵀU - I| of the router's orthonormal bases (eigenbasis routers)."""
        return None

    # -------------------------------------------------------------- routing
    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        exact_scores = getattr(self.plugin, "moe_router_exact_score_normalization", False)
        with patches.replaced("routing.aux-loss-scores", exact_aux_loss_scores) if exact_scores else nullcontext():
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.training:
            flat_mask = None if padding_mask is None else padding_mask.reshape(-1)
            self.moe_reg_last_routing = RoutingRecord(routing_map, flat_mask)
            if torch.is_grad_enabled():
                probs = self._attach_penalties(probs, self.moe_reg_last_routing)
                with record_function("moe_reg.routing"):  # a profiler range (benchmarks/loss_overhead.py)
                    self._record_geometry()
                    self._record_routing(logits, self.moe_reg_last_routing)
            for observer in self.moe_reg_observers:
                probs = observer.after_routing(self, logits, probs, routing_map, flat_mask)
        return probs, routing_map

    def _attach_penalties(self, probs: torch.Tensor, routing: RoutingRecord) -> torch.Tensor:
        """λ_sn·σ² (or hinge) + λ_sr/srank, once per micro-batch; parameter-only, so the value is
        the same on every rank and the local-mean scaling rules apply unchanged."""
        if not self.penalties_enabled:
            return probs
        p = self.plugin
        W = self.penalty_matrix()
        sigma = self.router_sigma()
        kwargs = dict(
            tp_cp_size=self.tp_cp_group.size(),
            calculate_per_token_loss=self.calculate_per_token_loss,
            num_local_tokens=routing.keep_mask().sum(),
        )
        if p.moe_router_spectral_penalty_coeff > 0:
            penalty = spectral_penalty(sigma, p.moe_router_spectral_target)
            probs = attach_local_mean_loss(probs, penalty, p.moe_router_spectral_penalty_coeff, **kwargs)
        if p.moe_router_stable_rank_coeff > 0:
            penalty = stable_rank_penalty(W.to(sigma.dtype), sigma)
            probs = attach_local_mean_loss(probs, penalty, p.moe_router_stable_rank_coeff, **kwargs)
        return probs

    def _record_routing(self, logits: torch.Tensor, routing: RoutingRecord) -> None:
        """Expert load every step; routing entropy of the full distribution on measured steps."""
        if self.moe_reg_stats is None:
            return
        keep = routing.keep_mask()
        self.moe_reg_stats.add(self.layer_number, routing.routing_map, keep)
        if self.moe_reg_measure and self.tracker is not None:
            scores = logits.detach().reshape(-1, self.config.num_moe_experts)
            score_function = self.config.moe_router_score_function
            entropy = routing_entropy(router_distribution(scores, score_function), keep)
            self.tracker.record(
                "routing_entropy", entropy, self.layer_number, self.config.num_layers, avg_group=self.tp_cp_group
            )
            if score_function != "softmax":
                lost = aux_score_mass_lost(scores, score_function, keep)
                self.tracker.record(
                    "aux_loss_score_mass_lost",
                    lost,
                    self.layer_number,
                    self.config.num_layers,
                    avg_group=self.tp_cp_group,
                )

    def _record_geometry(self) -> None:
        """The exact router geometry (and basis orthonormality error) once per measured step."""
        if not (self.moe_reg_measure and self.tracker is not None) or self._measured_step == self.moe_reg_step:
            return
        self._measured_step = self.moe_reg_step
        num_layers = self.config.num_layers
        with torch.no_grad():
            W = self.penalty_matrix().detach()
            for name, value in geometry_tensors(W, self.penalty_matrix_rank()).items():  # one fp64 Gram
                self.tracker.record(name, value, self.layer_number, num_layers)
            error = self.orthonormality_error()
            if error is not None:
                self.tracker.record("router_basis_orthonormality_error", error, self.layer_number, num_layers)
