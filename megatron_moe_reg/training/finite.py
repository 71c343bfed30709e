"""Non-finite values stop a run before they reach the weights (Megatron-LM's
``--check-for-nan-in-loss-and-grad`` semantics).

The test rides on the gradient norm every Megatron optimizer computes before it clips and updates
(one reduction whose value is read on the host anyway): while the step runs, that norm function
raises ``NonFiniteGradNorm`` when its result is nan or inf, so ``optimizer.step()`` returns before the
update. A non-finite LM or plugin loss gives non-finite gradients, so it is caught there; which loss
and layer is looked up only after the failure. No host synchronization is added, except with
``--clip-grad 0``, where Megatron computes no norm and the step computes one for the check.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_moe_reg.integration.megatron import patches


class NonFiniteGradNorm(Exception):
    def __init__(self, norm: float):
        super().__init__(f"gradient norm {norm}")
        self.norm = norm


def _checked(original):
    def get_grad_norm_fp32(*args, **kwargs):
        norm = original(*args, **kwargs)
        if not math.isfinite(float(norm)):
            raise NonFiniteGradNorm(float(norm))
        return norm

    return get_grad_norm_fp32


@contextlib.contextmanager
def checked_grad_norm(optimizer, enabled: bool) -> Iterator[None]:
    """While the block runs (``optimizer.step()``), a non-finite gradient norm raises before the update."""
    if not enabled:
        yield
        return
    with patches.replaced("training.grad-norm-check", _checked):
        if not any(o.config.clip_grad > 0 for o in getattr(optimizer, "chained_optimizers", [optimizer])):
            optimizer.get_grad_norm()  # Megatron computes no norm without clipping; the check needs one
        yield


def all_finite(module: torch.nn.Module) -> bool:
    """Every parameter of every rank is finite (one reduction; used before a checkpoint is written)."""
    device = next(module.parameters()).device
    bad = torch.zeros(1, device=device)
    for param in module.parameters():
        bad += (~torch.isfinite(param.detach())).any()
    dist.all_reduce(bad)
    return bool(bad.item() == 0)
