"""Where the experts' weights live, for every experts module the plugin supports.

Megatron's ``SequentialMLP`` keeps one MLP per local expert (``local_experts[i].linear_fc1.weight``,
[2F/etp, H] for SwiGLU, gate rows then up rows); ``TEGroupedMLP`` keeps ``linear_fc1.weight{i}``
with the same shapes. ``fc2`` weights are [H, F/etp]. With expert-tensor parallelism each rank
holds a slice of every local expert, so flattened dot products are sums over the ETP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

WEIGHT_KINDS = ("fc1", "fc2")


def local_expert_outputs(experts, sample_SH: torch.Tensor, num_local: int) -> torch.Tensor:
    """f_e(x) of each local expert on the same S rows, [num_local, S, H] in fp32 (router probabilities 1;
    under expert-tensor parallelism, this rank's partial sums of fc2)."""
    s = sample_SH.shape[0]
    dtype = next(experts.parameters()).dtype
    rows = sample_SH.to(dtype).repeat(num_local, 1)
    out, _ = experts(
        rows, torch.full((num_local,), s), torch.ones(rows.shape[0], dtype=torch.float32, device=rows.device)
    )
    return out.float().reshape(num_local, s, -1)


def local_expert_weights(experts, kind: str = "fc1") -> list[torch.Tensor]:
    """This rank's weight (slice) of each local expert, in local-expert order."""
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"kind must be one of {WEIGHT_KINDS}, got {kind!r}")
    name = f"linear_{kind}"
    if hasattr(experts, "local_experts"):  # SequentialMLP
        return [getattr(expert, name).weight for expert in experts.local_experts]
    linear = getattr(experts, name, None)
    if linear is not None and hasattr(linear, "weight0"):  # TEGroupedMLP
        return [getattr(linear, f"weight{i}") for i in range(experts.num_local_experts)]
    if hasattr(experts, f"{kind}_weight"):  # stacked [E_local, ...] weights
        stacked = getattr(experts, f"{kind}_weight")
        return list(stacked.unbind(0))
    raise TypeError(f"cannot read the expert weights of {type(experts).__name__}")


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; the gradient of a replicated loss is summed back (each rank holds a copy)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_experts_gram(experts, kind: str, ep_group, etp_group) -> torch.Tensor:
    """G[i, j] = <vec W_i, vec W_j> over all E experts of the layer (global expert order), fp32.

    Differentiable: each rank's slice gets the summed gradient of the copies of a loss computed
    identically on every rank of the EP x ETP group (all-gather backward = reduce-scatter).
    Memory: one gathered copy of the layer's expert weights (per ETP slice) during the loss.
    """
    local = torch.stack([w.reshape(-1) for w in local_expert_weights(experts, kind)]).float()
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        local = gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True, group=ep_group)
    gram = local @ local.t()
    if etp_group is not None and dist.get_world_size(etp_group) > 1:
        gram = _AllReduceSum.apply(gram, etp_group)
    return gram
