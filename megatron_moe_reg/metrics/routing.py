"""Routing entropy and expert load (pure functions, no gradient).

    routing entropy   H_route = mean_t  H(p_t) / log E,   H(p) = -Σ_e p_e log p_e       (inferred)
                      p_t = the router's full distribution over the E experts for token t
    load entropy      H_load  = H(c / Σc) / log E,         c_e = tokens routed to expert e (inferred)
    aux score loss    L_lost = mean_t ε / (Σ_e s_te + ε), ε = 1e-20, s = σ(z) or √softplus(z)
                      (the share of the distribution that Megatron's aux-loss normalization
                      s / (Σs + ε) drops; Megatron-LM #1545; ``losses.routing_scores``)
    load statistics   min, max, std of c; cv = std / mean; max violation = max / mean - 1
                      (Megatron-LM's MaxVio, the auxiliary-loss-free balancing paper's metric);
                      dead experts = #{e : c_e = 0} over the counting window

Both entropies lie in [0, 1]: 1 = uniform, 0 = one expert. Source labels: the routing-entropy
metric is named by arXiv 2602.14159 and SimBal (papers.md §1, §6b) without a formula; the
normalization by log E is our choice (so layers with different E compare).
"""

from __future__ import annotations

import math

import torch

from megatron_moe_reg.losses.routing_scores import MEGATRON_NORMALIZER_EPS, log_routing_scores, routing_distribution

LOAD_STATISTICS = ("load_min", "load_max", "load_std", "load_cv", "load_max_violation", "dead_experts", "load_entropy")


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=dim)


def _token_mean(values_T: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over the kept tokens (all without a mask; 0 for none): a weighted mean, not a boolean
    selection, so no host read."""
    if token_mask_T is None:
        return values_T.mean() if values_T.numel() else values_T.sum()
    keep = token_mask_T.reshape(-1).to(values_T)
    return (values_T * keep).sum() / keep.sum().clamp_min(1)


@torch.no_grad()
def routing_entropy(probs_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of the normalized entropy of each token's routing distribution, in [0, 1].

    ``probs_TE`` rows must be distributions (softmax of the router logits, or normalized
    sigmoid scores); ``token_mask_T`` (True = keep) drops padding.
    """
    p = probs_TE.double()
    num_experts = p.shape[-1]
    if num_experts < 2:
        return torch.zeros((), dtype=torch.float64, device=p.device)
    h = _entropy(p / p.sum(-1, keepdim=True).clamp_min(1e-30)) / math.log(num_experts)
    return _token_mean(h, token_mask_T)


@torch.no_grad()
def load_entropy(counts_E: torch.Tensor) -> torch.Tensor:
    """Normalized entropy of the load distribution c / Σc, in [0, 1] (0 when nothing was routed);
    over the last dimension (a [L, E] input gives one value per layer)."""
    c = counts_E.double()
    if c.shape[-1] < 2:
        return torch.zeros(c.shape[:-1], dtype=torch.float64, device=c.device)
    total = c.sum(-1, keepdim=True)
    h = _entropy(c / total.clamp_min(1e-30)) / math.log(c.shape[-1])
    return torch.where(total.squeeze(-1) > 0, h, torch.zeros_like(h))


@torch.no_grad()
def load_statistics_tensors(counts_LE: torch.Tensor) -> dict[str, torch.Tensor]:
    """``LOAD_STATISTICS`` of counts over the last dimension, as tensors (no host read)."""
    c = counts_LE.double()
    safe_mean = c.mean(-1).clamp_min(1e-30)
    std = c.std(-1, unbiased=False)
    top = c.amax(-1)
    return {
        "load_min": c.amin(-1),
        "load_max": top,
        "load_std": std,
        "load_cv": std / safe_mean,
        "load_max_violation": top / safe_mean - 1,
        "dead_experts": (c == 0).sum(-1).double(),
        "load_entropy": load_entropy(c),
    }


@torch.no_grad()
def load_statistics(counts_E: torch.Tensor) -> dict[str, float]:
    """min / max / std / cv / max violation / dead experts / load entropy of one layer's counts."""
    return {name: float(value) for name, value in load_statistics_tensors(counts_E).items()}


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 95)) -> dict[str, float]:
    """p50/p90/p95 (linear interpolation) of per-layer values."""
    if not values:
        return {}
    t = torch.tensor(values, dtype=torch.float64)
    found = torch.quantile(t, torch.tensor([q / 100 for q in qs], dtype=torch.float64)).tolist()
    return {f"p{q}": v for q, v in zip(qs, found, strict=True)}


def router_distribution(logits_TE: torch.Tensor, score_function: str = "softmax") -> torch.Tensor:
    """The router's full distribution over experts in fp64, for any score function
    (``losses.routing_scores.routing_distribution``: softmax, or normalized sigmoid / sqrtsoftplus scores)."""
    return routing_distribution(logits_TE.double(), score_function)


@torch.no_grad()
def aux_score_mass_lost(
    logits_TE: torch.Tensor, score_function: str, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over tokens of 1 - Σ_e s_e / (Σs + ε) = ε / (Σs + ε), ε = 1e-20: the share of the
    distribution that Megatron's normalization drops (0 for softmax; a value above 0 at the 1e-6
    level means the load-balancing loss is being lowered by shrinking scores). In fp64 from the
    fp32 scores Megatron computes; ``token_mask_T`` (True = keep) drops padding."""
    if score_function == "softmax":
        return torch.zeros((), dtype=torch.float64, device=logits_TE.device)
    scores = torch.exp(log_routing_scores(logits_TE.float(), score_function)).double()
    lost = MEGATRON_NORMALIZER_EPS / (scores.sum(-1) + MEGATRON_NORMALIZER_EPS)
    return _token_mean(lost, token_mask_T)
