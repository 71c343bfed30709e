"""Attaching plugin losses to the graph with Megatron's aux-loss scale semantics (one helper).

Megatron's ``MoEAuxLossAutoScaler.apply(activation, loss)`` leaves ``activation`` unchanged and,
in backward, gives ``loss`` the gradient ``main_loss_backward_scale``, which the pipeline
schedule sets to ``loss_scale / num_microbatches`` (``x cp_size``; just ``loss_scale`` with
``calculate_per_token_loss``). Every plugin loss is a *local mean* over the tokens of this rank
(its sequence-parallel shard of one micro-batch), like Megatron's z-loss. Then:

- TP x CP: each rank of a TP x CP group holds 1/(tp*cp) of the replica's tokens and all their
  gradients are summed (router weights are tagged ``sequence_parallel``; activations meet in the
  sequence-parallel collectives' backward), so the coefficient is divided by ``tp_cp_size``
  (Megatron's z-loss convention): sum of the ranks' terms = coefficient x mean over the replica.
- DP and micro-batches: DDP averages over DP and the scale above averages over micro-batches,
  as for the LM loss.
- ``calculate_per_token_loss``: ``finalize_model_grads`` later divides every gradient by the
  global token count, which is num_microbatches x dp x (num_local_tokens x tp_cp_size); the loss
  is multiplied by ``num_local_tokens x tp_cp_size`` to cancel it (megatron-core 0.19's z-loss
  semantics, PR #5047; 0.16's z-loss omits the tp_cp factor).
- Expert weights receive these losses' gradients through the token all-to-alls from the source
  ranks, and DDP's net expert-gradient scale (1/dp_cp) equals the dense one, so no expert-side
  factor is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_moe_reg.losses.routing_scores import routing_distribution


def local_mean_scale(
    coeff: float, tp_cp_size: int, calculate_per_token_loss: bool, num_local_tokens: int | torch.Tensor
) -> float | torch.Tensor:
    """The factor multiplying a local-mean loss before it is attached."""
    scale: float | torch.Tensor = coeff / tp_cp_size
    if calculate_per_token_loss:
        scale = scale * num_local_tokens * tp_cp_size
    return scale


def attach_local_mean_loss(
    activation: torch.Tensor,
    loss: torch.Tensor,
    coeff: float,
    *,
    tp_cp_size: int,
    calculate_per_token_loss: bool,
    num_local_tokens: int | torch.Tensor,
) -> torch.Tensor:
    """Attach ``coeff x loss`` (``loss`` a mean over this rank's tokens) to ``activation``.

    Returns the activation to use from now on (the autograd node must stay in the graph).
    """
    if coeff == 0 or not torch.is_grad_enabled() or not loss.requires_grad:
        return activation
    scale = local_mean_scale(coeff, tp_cp_size, calculate_per_token_loss, num_local_tokens)
    return MoEAuxLossAutoScaler.apply(activation, loss * scale)


def aux_loss_backward_scale() -> torch.Tensor:
    """The scale the schedule set for aux-loss gradients (1 when none was set yet)."""
    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    return torch.ones(()) if scale is None else scale


def attach_to_experts_output(
    output: tuple[torch.Tensor, Any], loss: torch.Tensor, coeff: float, router: Any, num_local_tokens: Any
) -> tuple[torch.Tensor, Any]:
    """An experts module's ``(out, bias)`` with ``coeff x loss`` attached to ``out``, scaled by the
    rules above for the layer's router (its TP x CP group, ``calculate_per_token_loss``)."""
    out, bias = output
    out = attach_local_mean_loss(
        out,
        loss,
        coeff,
        tp_cp_size=router.tp_cp_group.size(),
        calculate_per_token_loss=router.config.calculate_per_token_loss,
        num_local_tokens=num_local_tokens,
    )
    return out, bias


def exact_aux_loss_scores(original: Any) -> Any:
    """A replacement for megatron-core's ``compute_routing_scores_for_aux_loss`` that normalizes
    sigmoid and sqrtsoftplus scores in log space (``losses.routing_scores``: no 1e-20 epsilon, so
    the load-balancing losses cannot be lowered by shrinking every score; Megatron-LM #1545).
    Softmax scores go to ``original``; the TE-fused path (``fused``) is replaced too. The routing
    map is the top-k of the scores, zeroed with the scores at padding, as in megatron-core."""

    def scores_for_aux_loss(logits, topk, score_function, fused=False, padding_mask=None):
        if score_function == "softmax":
            return original(logits, topk, score_function, fused=fused, padding_mask=padding_mask)
        scores = routing_distribution(logits, score_function).float()
        top = torch.topk(scores, k=topk, dim=1).indices
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True)
        if padding_mask is not None:
            valid = ~padding_mask.reshape(-1, 1).to(torch.bool)
            routing_map, scores = routing_map & valid, scores * valid
        return routing_map, scores

    return scores_for_aux_loss
