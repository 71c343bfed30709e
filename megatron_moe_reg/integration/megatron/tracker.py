"""The plugin's own per-layer metrics tracker.

Megatron-LM's ``training_log`` reports only Megatron's four MoE losses and then clears the
whole megatron-core tracker, so plugin metrics live here. Reduction follows megatron-core
0.17+'s ``MoEMetricsTracker``: sum over the pipeline group, then ``reduce_group`` (SUM),
``avg_group`` (AVG) and the data-parallel group (AVG). Values recorded in several
micro-batches are averaged over the micro-batches (each layer keeps a record count), and
the summary of a metric is its mean over the layers that recorded it (a coupling loss has
one value per pair of consecutive MoE layers, not per MoE layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Entry:
    values: torch.Tensor  # [num_layers] sums of recorded values (on the metrics device)
    counts: list[int]  # [num_layers] number of records (on the host: counting needs no device op)
    reduce_group: dist.ProcessGroup | None = None
    avg_group: dist.ProcessGroup | None = None
    needs_dp_avg: bool = True


def metrics_device() -> torch.device:
    """Where metric buffers live: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class PluginMetricsTracker:
    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def ensure(self, name: str, num_layers: int, **groups) -> Entry:
        if name not in self._entries:
            zeros = torch.zeros(num_layers, dtype=torch.float64, device=metrics_device())
            self._entries[name] = Entry(values=zeros, counts=[0] * num_layers)
        entry = self._entries[name]
        for key, value in groups.items():
            setattr(entry, key, value)
        return entry

    def record(
        self,
        name: str,
        value: torch.Tensor,
        layer_number: int,
        num_layers: int,
        *,
        reduce_group=None,
        avg_group=None,
        needs_dp_avg: bool = True,
    ) -> None:
        """Add one value for ``layer_number`` (1-based, global)."""
        entry = self.ensure(name, num_layers, reduce_group=reduce_group, avg_group=avg_group, needs_dp_avg=needs_dp_avg)
        entry.values.select(0, layer_number - 1).add_(value.detach())  # fp64 accumulation, no host read
        entry.counts[layer_number - 1] += 1

    def report(
        self,
        names: list[str],
        num_layers: int,
        iteration: int,
        writer=None,
        per_layer: bool = True,
        prefix: str = "moe_reg",
    ) -> dict[str, float]:
        """Reduce across ranks (call on every rank), write TensorBoard scalars, clear.

        Returns ``{name: mean over recording layers}`` and, per layer, ``{name}_layer_{i}``
        (0-based MoE-agnostic layer index, as Megatron's per-layer logging).
        """
        from megatron.core import parallel_state as ps

        names = list(dict.fromkeys(names))
        entries = [self.ensure(name, num_layers) for name in names]
        if not entries:
            return {}
        # one PP all-reduce for every metric, then one all-reduce per distinct (group, op) sequence;
        # the names (and their groups) are the same on every rank, so are the collectives
        counts = torch.tensor([e.counts for e in entries], dtype=torch.float64, device=entries[0].values.device)
        stats = torch.stack([torch.stack([e.values for e in entries]), counts], dim=1)  # [metrics, 2, layers]
        dist.all_reduce(stats, group=ps.get_pipeline_model_parallel_group())
        values, counts = stats[:, 0], stats[:, 1]
        buckets: dict[tuple, list[int]] = {}
        for i, e in enumerate(entries):
            buckets.setdefault((id(e.reduce_group), id(e.avg_group), e.needs_dp_avg), []).append(i)
        for rows in buckets.values():
            e = entries[rows[0]]
            part = values[rows].clone()
            if e.reduce_group is not None:
                dist.all_reduce(part, group=e.reduce_group)
            if e.avg_group is not None:
                dist.all_reduce(part, group=e.avg_group, op=dist.ReduceOp.AVG)
            if e.needs_dp_avg:
                dist.all_reduce(part, group=ps.get_data_parallel_group(), op=dist.ReduceOp.AVG)
            values[rows] = part
        present = counts > 0
        per_layer_mean = torch.where(present, values / counts.clamp_min(1), torch.zeros_like(values))
        host = torch.stack([per_layer_mean, present.to(per_layer_mean)]).tolist()  # one host read
        out: dict[str, float] = {}
        for name, means, flags in zip(names, host[0], host[1], strict=True):
            layers = [i for i, flag in enumerate(flags) if flag]
            if not layers:
                continue
            out[name] = sum(means[i] for i in layers) / len(layers)
            if per_layer:
                out.update({f"{name}_layer_{i}": means[i] for i in layers})
            if writer is not None:
                writer.add_scalar(f"{prefix}/{name}", out[name], iteration)
                if per_layer:
                    for i in layers:
                        writer.add_scalar(f"{prefix}/{name}_layer_{i}", means[i], iteration)
        for e in entries:
            e.values.zero_()
            e.counts = [0] * len(e.counts)
        return out

    def clear(self) -> None:
        for entry in self._entries.values():
            entry.values.zero_()
            entry.counts = [0] * len(entry.counts)
