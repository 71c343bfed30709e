"""Dataset index caches on node-local disks.

megatron-core's GPT datasets build their index caches (``--data-cache-path``) on global rank 0 only;
every other rank waits, then loads them. That needs a cache directory every node sees. When the
directory is local to each node (the same path on each node's own disk), the first rank of every
other node would find nothing to load, so it builds its node's copy first (``prebuilt_per_node``).
Which case holds is found out, not assumed: global rank 0 leaves a marker file, and every rank looks
for it (``visible_everywhere``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_moe_reg.integration.megatron import patches


def visible_everywhere(directory: str) -> bool:
    """Whether every rank sees the files global rank 0 writes into ``directory`` (collective)."""
    path = Path(directory)
    token: list[Any] = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = path / f".moe-reg-visible-{token[0]}"
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
    dist.barrier()
    seen = torch.tensor([int(marker.exists())], dtype=torch.int64)
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    dist.barrier()
    if dist.get_rank() == 0:
        marker.unlink()
    return bool(seen.item())


def prebuilt_per_node(cache: str | None, build: Callable[[], Any]) -> None:
    """Before a collective build: with a node-local ``cache``, the first rank of every node but the
    first runs ``build`` alone (no process group in view, so megatron-core writes this node's cache)."""
    if not cache or not dist.is_initialized() or dist.get_world_size() == 1 or visible_everywhere(cache):
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and dist.get_rank() != 0:
        with patches.replaced("data.node-local-cache", lambda original: lambda: False):
            build()
    dist.barrier()
