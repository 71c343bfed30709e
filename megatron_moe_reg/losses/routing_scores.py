"""A router's full distribution over the E experts, for every Megatron score function.

    softmax        s = softmax(z)
    sigmoid        s = σ(z) / Σ_e σ(z_e)            = softmax(log σ(z))
    sqrtsoftplus   s = √softplus(z) / Σ_e √softplus(z_e) = softmax(½ log softplus(z))

Megatron's ``compute_routing_scores_for_aux_loss`` normalizes the sigmoid and sqrtsoftplus scores
as s / (Σs + 1e-20) (paper-free; Megatron's code). When every score of a token falls below about
1e-20 (logits below about -46), the normalized scores no longer sum to 1 and the load-balancing
loss drops below its balanced value of 1 without any balancing: the router can lower it by pushing
all its scores towards 0 (NVIDIA/Megatron-LM #1545, seen in OLMo-core PR #255). Here the division
is done in log space, softmax(log s), which is the same quotient without an epsilon: equal to
Megatron's to within 1e-20 relative while Σs ≫ 1e-20, and still a distribution when every score
underflows (inferred; the fix proposed in #1545 is a smaller epsilon, which only moves the
threshold). ``metrics.routing.aux_score_mass_lost`` measures how far a batch is into that regime.

All math in fp32 at least (fp64 inputs stay fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_moe_reg.config import SCORE_FUNCTIONS
from megatron_moe_reg.losses.specialization import at_least_fp32

MEGATRON_NORMALIZER_EPS = 1e-20  # Megatron's s / (Σs + 1e-20), moe_utils 0.16-0.19
_LOG_SOFTPLUS_SWITCH = -15.0  # below it, log softplus(z) = z - e^z/2 + O(e^{2z})


def log_softplus(z: torch.Tensor) -> torch.Tensor:
    """log softplus(z), finite for every finite z (softplus underflows to 0 below about -104 in fp32)."""
    tail = z - 0.5 * torch.exp(z.clamp_max(_LOG_SOFTPLUS_SWITCH))
    body = torch.log(F.softplus(z.clamp_min(_LOG_SOFTPLUS_SWITCH)))  # clamped: no 0·inf in the unused branch
    return torch.where(z < _LOG_SOFTPLUS_SWITCH, tail, body)


def log_routing_scores(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """log s of the unnormalized scores: log σ(z) or ½ log softplus(z); the logits for softmax."""
    z = at_least_fp32(logits_TE)
    if score_function == "softmax":
        return z
    if score_function == "sigmoid":
        return F.logsigmoid(z)
    if score_function == "sqrtsoftplus":
        return 0.5 * log_softplus(z)
    raise ValueError(f"unknown score function {score_function!r}; choose one of {SCORE_FUNCTIONS}")


def routing_distribution(logits_TE: torch.Tensor, score_function: str = "softmax") -> torch.Tensor:
    """The full routing distribution s over all experts (rows sum to 1), fp32 at least."""
    return torch.softmax(log_routing_scores(logits_TE, score_function), dim=-1)
