"""CPU runtime layer: lets the real megatron-core train on CPU with gloo.

megatron-core assumes CUDA in a few dozen places (buffers allocated on
``torch.cuda.current_device()``, side streams in the DDP and the alltoall token
dispatcher, ``device="cuda"`` tensors in the schedules, the optimizer and the
checkpoint verifier, the CUDA RNG tracker). The rows of scope ``cpu`` in the patch table
(``patches.PATCHES``) map those onto the CPU, each with its reason and the megatron-core
versions it applies to; their replacement values are in ``host_device``. ``activate()``
applies them once and only when CUDA is absent (with megatron-core's own fixes, scope
``megatron-core``, which the drivers apply on every machine); on a GPU machine it does nothing.
"""

from __future__ import annotations

import logging

import torch

from megatron_moe_reg.integration.megatron import patches

log = logging.getLogger(__name__)

_ACTIVE = False


def is_active() -> bool:
    return _ACTIVE


def activate() -> bool:
    """Apply the CPU runtime patches once when CUDA is absent. Returns whether they are active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    patches.fix_megatron_core()
    count = patches.apply_scope("cpu")
    _ACTIVE = True
    log.info("megatron-core CPU runtime active (%d patches)", count)
    return True
