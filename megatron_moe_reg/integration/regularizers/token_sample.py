"""The deterministic token subsample of ``--moe-specialization-max-tokens N``.

Of the M tokens of a micro-batch (its s x b positions in Megatron's [s, b] order, split over the
sequence-parallel ranks in rank order), R_sp keeps the N evenly spaced positions

    g_i = floor(i * M / N),  i = 0 .. N-1                                         (inferred)

so the subset is the same whatever the parallel layout. A rank holding positions
[start, start + count) keeps those g_i in its range: i from ceil(start N / M) to
ceil((start + count) N / M). Host arithmetic and device ``arange``: no host-device synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def sample_bounds(total: int, n: int, start: int, count: int) -> tuple[int, int]:
    """The range of i whose position g_i lies in [start, start + count)."""
    if n >= total:
        return start, start + count
    return _ceil_div(start * n, total), _ceil_div((start + count) * n, total)


def sample_count(total: int, n: int, start: int, count: int) -> int:
    lo, hi = sample_bounds(total, n, start, count)
    return hi - lo


@dataclass(frozen=True)
class TokenSample:
    """A rank's sampled tokens: local indices [n], and for each local token its sample index or -1."""

    indices: torch.Tensor  # [n] long, ascending local token indices
    sample_index: torch.Tensor  # [count] long, -1 for tokens outside the sample

    @property
    def size(self) -> int:
        return self.indices.shape[0]


def token_sample(total: int, n: int, start: int, count: int, device) -> TokenSample:
    """The sample of the rank holding positions [start, start + count) of ``total``."""
    lo, hi = sample_bounds(total, n, start, count)
    i = torch.arange(lo, hi, device=device)
    indices = i - start if n >= total else (i * total) // n - start
    sample_index = torch.full((count,), -1, dtype=torch.long, device=device)
    sample_index[indices] = torch.arange(indices.shape[0], device=device)
    return TokenSample(indices, sample_index)
