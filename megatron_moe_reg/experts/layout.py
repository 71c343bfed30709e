"""Where each expert's rows and weights are: row offsets, weight stacks and pointer tables."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

Weights = torch.Tensor | Sequence[torch.Tensor]


def expert_offsets(tokens_per_expert: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """int32 [E + 1] on ``device``: rows of expert e are ``x[offsets[e]:offsets[e + 1]]``
    (no host-device synchronization)."""
    counts = torch.as_tensor(tokens_per_expert).to(device=device, dtype=torch.int32, non_blocking=True)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def as_list(weights: Weights) -> list[torch.Tensor]:
    return list(weights.unbind(0)) if isinstance(weights, torch.Tensor) else list(weights)


def stacked(weights: Weights) -> torch.Tensor:
    """The weights as one [E, out, in] tensor: the tensor itself, a zero-copy view when the
    experts' weights lie evenly spaced in one storage, else a copy (``torch.stack``)."""
    if isinstance(weights, torch.Tensor):
        return weights
    first = weights[0]
    if len(weights) > 1 and all(
        w.shape == first.shape
        and w.stride() == first.stride()
        and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for w in weights
    ):
        step = weights[1].storage_offset() - first.storage_offset()
        if step > 0 and all(w.storage_offset() == first.storage_offset() + i * step for i, w in enumerate(weights)):
            return first.as_strided((len(weights), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(list(weights))


_POINTER_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_MAX_TABLES = 256


def pointer_table(weights: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 addresses of the experts' weights on ``device``, cached (weights rarely move)."""
    key = (str(device), tuple(w.data_ptr() for w in weights))
    table = _POINTER_TABLES.get(key)
    if table is None:
        table = torch.tensor(key[1], dtype=torch.int64, device=device)
        _POINTER_TABLES[key] = table
        if len(_POINTER_TABLES) > _MAX_TABLES:
            _POINTER_TABLES.popitem(last=False)
    else:
        _POINTER_TABLES.move_to_end(key)
    return table
