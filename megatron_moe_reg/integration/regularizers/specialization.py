"""R_sp inside Megatron, exact under expert, tensor and expert-tensor parallelism, with no host sync.

A token's k routed experts may live on different EP ranks, and with expert-tensor parallelism
each rank holds only an F/etp slice of an expert's activation. Every co-activated pair counts, so
each token's rows meet on the rank that owns the token:

1. capture: a forward pre-hook on the experts' ``linear_fc2`` (each local expert of
   ``SequentialMLP``, or ``TEGroupedMLP``'s grouped linear) takes fc2's input: the SwiGLU
   intermediate z, scaled by the router probability p > 0 where Megatron applies it there. A
   cosine is scale-invariant, cos²(p_e z_e, p_ν z_ν) = cos²(z_e, z_ν), and this is the tensor fc2
   keeps for its own backward (no copy, no recomputation). The plugin's grouped-GEMM experts hand
   over the z their kernels keep. Under ``--recompute-modules moe_act`` (fc2's input is discarded
   and recomputed) and for an overlapped shared expert, a hook on ``linear_fc1`` recomputes z as
   Megatron's MLP does, keeping only fc1's output.
2. where each row belongs: rows leave the experts in Megatron's permuted order (expert-major,
   tokens ascending), so a row's token and slot follow from the routing map alone
   (``losses.specialization_rows.permuted_pairs``); nothing is dispatched again.
3. return to the owner, reusing what the dispatcher computed:
   - a dispatch group of one rank: no communication;
   - alltoall: the dispatcher's own un-sort and ETP reduce-scatter, then the EP all-to-all with its
     split sizes (``compat.combine_rows``): the rows travel as Megatron's combine moves its output;
   - allgather: each rank scatters its rows into a [group tokens x k] buffer at (token, slot) and
     the buffer is summed onto the owners over the TP x EP group (a reduce-scatter, the volume of
     Megatron's own combine, done as one equal-split all-to-all and a local sum); the routing map
     is gathered (bools, no gradient) for the slots, as the dispatch does;
   - ``--moe-specialization-max-tokens N``: only the sampled tokens' rows travel, through the same
     buffer and sum (alltoall: the owners send each row's buffer index, one integer per row, along
     the dispatch's split sizes, asynchronously while the experts compute).
4. loss and attachment: ``losses.specialization_rows`` (a Gram autograd function that saves the
   rows, their positions and the token weights, and recomputes Ẑ and the Gram in backward),
   attached to the experts' output with Megatron's aux-loss scale semantics
   (``aux_loss.attach_to_experts_output``); gradients flow back through the same collectives.

Extra communication per MoE layer and micro-batch under EP/ETP, forward and backward: the k x F
values per token (alltoall), or the [group tokens x k x F] buffer summed onto the owners (allgather:
the volume of Megatron's own combine at width k x F). Computed only in calls with gradients
enabled, so activation recompute counts each micro-batch once; a measure-only step computes it
without gradient.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import all_to_all, all_to_all_hp2sp, gather_from_sequence_parallel_region
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from megatron_moe_reg.integration.megatron.aux_loss import attach_to_experts_output
from megatron_moe_reg.integration.megatron.compat import (
    combine_rows,
    dispatcher_kind,
    dispatcher_source_rows,
    start_dispatch_rows,
)
from megatron_moe_reg.integration.regularizers.base import InstallContext, RegularizerBase, StepPlan
from megatron_moe_reg.integration.regularizers.token_sample import TokenSample, sample_count, token_sample
from megatron_moe_reg.losses.specialization_rows import (
    mean_weights,
    permuted_pairs,
    slot_of,
    specialization_loss_from_rows,
)


def glu_intermediate(fc1_output: torch.Tensor, bias: torch.Tensor | None, config) -> torch.Tensor:
    """The input of fc2 before router-probability scaling, as Megatron's MLP computes it."""
    x = fc1_output if bias is None else fc1_output + bias
    if not config.gated_linear_unit:
        return config.activation_func(x)
    gate, linear = torch.chunk(x, 2, dim=-1)
    clamp = getattr(config, "activation_func_clamp_value", None)
    if clamp is not None:
        gate = gate.clamp(max=clamp)
        linear = linear.clamp(min=-clamp, max=clamp)
    return config.activation_func(gate) * (linear + getattr(config, "glu_linear_offset", 0.0))


def _recomputed(fn, *args):
    """``fn(*args)`` keeping only its inputs for backward (intermediates are recomputed)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def _expert_modules(experts, name: str) -> list:
    """The ``linear_{name}`` module(s) of an experts module, in the order its rows are processed."""
    attr = f"linear_{name}"
    if hasattr(experts, "local_experts"):  # SequentialMLP
        return [getattr(expert, attr) for expert in experts.local_experts]
    if hasattr(experts, attr):  # TEGroupedMLP (and the plugin's grouped experts)
        return [getattr(experts, attr)]
    raise TypeError(f"the specialization loss cannot read activations of {type(experts).__name__}")


def _fc1_modules(experts) -> list:
    return _expert_modules(experts, "fc1")


def _place(index: torch.Tensor, slot: torch.Tensor, base, stride: int, dropped: int) -> torch.Tensor:
    """A row's position (base + index) x stride + slot in a buffer of tokens x slots, or ``dropped``
    where its token is outside the sample (index -1)."""
    return torch.where(index >= 0, (base + index) * stride + slot, torch.full_like(index, dropped))


def _summed_at_owners(buffer: torch.Tensor, group) -> torch.Tensor:
    """[group x m, F] on every rank -> [m, F] on each: the sum over ranks of their block for this
    rank, as a reduce-scatter, by one equal-split all-to-all and a local sum (the same bytes on the
    wire as a ring reduce-scatter; several times faster than gloo's reduce-scatter). Each value
    is written by at most one rank (the others hold zeros), so the sum is exact. Differentiable
    (the backward is an all-to-all)."""
    received = all_to_all(group, buffer)
    return received.view(group.size(), -1, buffer.shape[-1]).sum(dim=0)


class SpecializationProbe:
    """R_sp of one MoE layer: capture, return to owners, loss, attachment and logging."""

    def __init__(
        self,
        moe_layer,
        *,
        coeff: float,
        include_shared: bool,
        max_tokens: int,
        tracker,
        num_layers: int,
        gram_kernel: str = "auto",
    ):
        from megatron.core import parallel_state as ps

        self.layer = moe_layer
        self.router, self.dispatcher, self.experts = moe_layer.router, moe_layer.token_dispatcher, moe_layer.experts
        self.config = moe_layer.config
        self.coeff, self.include_shared, self.max_tokens = coeff, include_shared, max_tokens
        self.gram_kernel = gram_kernel
        self.tracker, self.num_layers = tracker, num_layers
        self.measure = False
        self.kind = dispatcher_kind(self.dispatcher)
        self.k = self.config.moe_router_topk
        self.slots = self.k + (1 if include_shared else 0)
        self.group = self.dispatcher.tp_ep_group
        self.group_size = self.group.size()
        self.my_index = dist.get_process_group_ranks(self.group).index(dist.get_rank())
        self.shard, self.num_shards = self.dispatcher.tp_rank, self.dispatcher.tp_size  # F-slices (ETP)
        self.local_offset = moe_layer.local_expert_indices[0]
        self.num_local_experts = len(moe_layer.local_expert_indices)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_rank, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.member_tp_ranks = [self.tp_rank] * self.group_size  # each group member's TP rank
        if self.group_size > 1 and self.kind == "allgather":
            dist.all_gather_object(self.member_tp_ranks, self.tp_rank, group=self.group)
        self._cache: dict = {}
        self._rows: list[torch.Tensor] = []
        self._shared_rows: torch.Tensor | None = None
        self._pending_targets = None  # the sampled rows' buffer targets, in flight to the experts
        recompute_act = "moe_act" in (self.config.recompute_modules or [])
        if hasattr(self.experts, "register_activation_hook"):  # grouped GEMM experts hand z over
            self.handles = [self.experts.register_activation_hook(self._capture_activation)]
        elif recompute_act:
            self.handles = [m.register_forward_hook(self._capture_fc1) for m in _expert_modules(self.experts, "fc1")]
        else:
            fc2 = _expert_modules(self.experts, "fc2")
            self.handles = [m.register_forward_pre_hook(self._capture_fc2_input) for m in fc2]
        self.handles.append(self.experts.register_forward_pre_hook(self._before_experts))
        self.handles.append(self.experts.register_forward_hook(self._after_experts))
        if include_shared:
            shared = moe_layer.shared_experts
            if recompute_act or getattr(self.config, "moe_shared_expert_overlap", False):
                self.handles.append(shared.linear_fc1.register_forward_hook(self._capture_shared_fc1))
            else:
                self.handles.append(shared.linear_fc2.register_forward_pre_hook(self._capture_shared_fc2_input))

    @property
    def active(self) -> bool:
        return (self.coeff > 0 or self.measure) and self.layer.training and torch.is_grad_enabled()

    # ------------------------------------------------------------------ capture
    def _capture_fc2_input(self, module, args) -> None:
        if self.active:
            self._rows.append(args[0].reshape(-1, args[0].shape[-1]))

    def _capture_fc1(self, module, inputs, output) -> None:
        if self.active:
            out, bias = output if isinstance(output, tuple) else (output, None)
            self._rows.append(_recomputed(glu_intermediate, out, bias, self.config))

    def _capture_activation(self, module, z) -> None:
        if self.active:
            self._rows.append(z)

    def _capture_shared_fc2_input(self, module, args) -> None:
        if self.active:
            self._shared_rows = args[0].reshape(-1, args[0].shape[-1])

    def _capture_shared_fc1(self, module, inputs, output) -> None:
        if self.active:
            out, bias = output if isinstance(output, tuple) else (output, None)
            z = _recomputed(glu_intermediate, out, bias, self.config)
            self._shared_rows = z.reshape(-1, z.shape[-1])

    # ------------------------------------------------------------------ token sample
    def _sample(self, num_tokens: int, tp_rank: int, device) -> TokenSample | None:
        """The sampled tokens of the TP rank ``tp_rank`` (None: every token)."""
        total = num_tokens * self.tp_size
        if not self.max_tokens or self.max_tokens >= total:
            return None
        key = (num_tokens, tp_rank)
        if key not in self._cache:
            self._cache[key] = token_sample(total, self.max_tokens, tp_rank * num_tokens, num_tokens, device)
        return self._cache[key]

    def _block(self, num_tokens: int) -> int:
        """Tokens per owner in a group buffer: all, or the largest sample over the TP ranks."""
        total = num_tokens * self.tp_size
        if not self.max_tokens or self.max_tokens >= total:
            return num_tokens
        return max(sample_count(total, self.max_tokens, r * num_tokens, num_tokens) for r in range(self.tp_size))

    def _token_index(self, num_tokens: int, tp_rank: int, device) -> torch.Tensor:
        """Each token's index among the owner's buffer tokens (-1: outside the sample)."""
        sample = self._sample(num_tokens, tp_rank, device)
        if sample is not None:
            return sample.sample_index
        key = ("all", num_tokens)
        if key not in self._cache:
            self._cache[key] = torch.arange(num_tokens, device=device)
        return self._cache[key]

    # ------------------------------------------------------------------ loss
    def _before_experts(self, module, args) -> None:
        """alltoall with a token sample: the owners send their rows' buffer targets now, so the
        all-to-all runs while the experts compute (``_buffer_targets`` waits for it)."""
        self._pending_targets = None
        if not (self.active and self.kind == "alltoall" and self.group_size > 1):
            return
        routing = self.router.moe_reg_last_routing
        if self._sample(routing.num_tokens, self.tp_rank, routing.routing_map.device) is not None:
            self._pending_targets = start_dispatch_rows(self.dispatcher, self._owner_targets(routing))

    def _after_experts(self, module, inputs, output):
        if not self.active:
            return None
        chunks, self._rows = self._rows, []
        shared, self._shared_rows = self._shared_rows, None
        routing = self.router.moe_reg_last_routing
        if not chunks:  # no rows reached this rank's experts: still take part in the collectives
            width = self.config.moe_ffn_hidden_size // self.num_shards
            chunks = [output[0].new_zeros(0, width)]
        keep = routing.keep_mask()
        with contextlib.nullcontext() if self.coeff > 0 else torch.no_grad():
            with record_function("moe_reg.R_sp.return"):  # profiler ranges (benchmarks/loss_overhead.py)
                rows, positions, weights = self._rows_at_owner(chunks, routing, keep)
                if shared is not None:
                    shared_rows, shared_positions = self._shared_at_owner(shared, routing.num_tokens, weights.shape[0])
                    rows.append(shared_rows.to(rows[0].dtype))
                    positions = torch.cat([positions, shared_positions])
            # dropless routing and every token: each (token, slot) gets exactly one row
            every_token = self._sample(routing.num_tokens, self.tp_rank, keep.device) is None
            complete = self.config.moe_expert_capacity_factor is None and every_token
            with record_function("moe_reg.R_sp.gram"):
                loss = specialization_loss_from_rows(
                    rows, positions, weights, self.slots, complete=complete, kernel=self.gram_kernel
                )
        self.tracker.record(
            "specialization_loss",
            loss.detach(),
            self.router.layer_number,
            self.num_layers,
            avg_group=self.router.tp_cp_group,
        )
        with record_function("moe_reg.R_sp.attach"):
            return attach_to_experts_output(output, loss, self.coeff, self.router, keep.sum())

    def _rows_at_owner(self, chunks, routing, keep) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(row chunks, their positions, token weights) on the rank that owns the tokens."""
        sample = self._sample(routing.num_tokens, self.tp_rank, keep.device)
        if self.group_size > 1 and (self.kind == "allgather" or sample is not None):
            return self._summed_buffer(torch.cat(chunks), routing, keep, sample)
        if self.group_size > 1:  # alltoall, every token: the rows come back as Megatron's combine
            chunks = [combine_rows(self.dispatcher, self._full_width(torch.cat(chunks)))]
        num_rows = sum(c.shape[0] for c in chunks)
        token, expert = permuted_pairs(routing.routing_map, num_rows)
        slot = slot_of(routing.routing_map, token, expert)
        if sample is None:
            return chunks, token * self.slots + slot, mean_weights(keep)
        positions = _place(sample.sample_index[token], slot, 0, self.slots, sample.size * self.slots)
        return chunks, positions, self._sample_weights(keep[sample.indices])

    def _sample_weights(self, sampled_keep: torch.Tensor) -> torch.Tensor:
        """w_i = tp · keep_i / (kept sampled tokens of the TP group): with the TP ranks' terms
        averaged (the aux-loss scaling), the mean over the group's kept sampled tokens, however
        unevenly the sample falls on the ranks (one scalar all-reduce over TP, on the device)."""
        keep = sampled_keep.to(torch.float32)
        count = keep.sum()
        if self.tp_size > 1:
            dist.all_reduce(count, group=self.tp_group)
        return keep * self.tp_size / count.clamp_min(1)

    def _full_width(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's F-slice in a full-width row (zeros elsewhere), for a summing collective."""
        if self.num_shards == 1:
            return rows
        width = rows.shape[-1]
        return torch.nn.functional.pad(rows, (self.shard * width, (self.num_shards - 1 - self.shard) * width))

    def _summed_buffer(self, rows, routing, keep, sample: TokenSample | None):
        """Rows scattered into a [group x block x k] buffer, summed onto their owners."""
        num_tokens, k = routing.num_tokens, self.k
        block = self._block(num_tokens)
        target = self._buffer_targets(rows.shape[0], routing, block)
        buffer = rows.new_zeros(self.group_size * block * k + 1, self.num_shards, rows.shape[-1])
        buffer.index_put_((target, torch.full_like(target, self.shard)), rows)  # a fresh buffer: in place
        buffer = buffer[:-1].reshape(self.group_size * block * k, -1)
        mine = _summed_at_owners(buffer, self.group)  # [block * k, F]
        device = mine.device
        positions = torch.arange(block, device=device)[:, None] * self.slots + torch.arange(k, device=device)
        if sample is None:
            return [mine], positions.reshape(-1), mean_weights(keep)
        sampled_keep = torch.zeros(block, dtype=torch.bool, device=keep.device)
        sampled_keep[: sample.size] = keep[sample.indices]
        return [mine], positions.reshape(-1), self._sample_weights(sampled_keep)

    def _buffer_targets(self, num_rows: int, routing, block: int) -> torch.Tensor:
        """Each expert-side row's index in the group buffer ((owner x block + token) x k + slot);
        one past the buffer drops a row."""
        if self.kind == "alltoall":  # the owners named their rows' targets, sent as the tokens were
            pending, self._pending_targets = self._pending_targets, None
            return (pending or start_dispatch_rows(self.dispatcher, self._owner_targets(routing)))()
        k, num_tokens = self.k, routing.num_tokens
        trash = self.group_size * block * k
        with torch.no_grad():  # allgather: the group's routing map, gathered as the dispatch does
            group_map = gather_from_sequence_parallel_region(routing.routing_map, group=self.group)
        local_map = group_map[:, self.local_offset : self.local_offset + self.num_local_experts]
        token, expert = permuted_pairs(local_map, num_rows)
        slot = slot_of(group_map, token, expert + self.local_offset)
        owner, local = token // num_tokens, token % num_tokens
        index = self._group_token_index(num_tokens, token.device)[owner, local]
        return _place(index, slot, owner * block, k, trash)

    def _owner_targets(self, routing) -> torch.Tensor:
        """alltoall: the group-buffer index of each row this rank's tokens sent to the experts, in
        the dispatcher's permuted order (one past the buffer: a token outside the sample)."""
        k, num_tokens = self.k, routing.num_tokens
        block = self._block(num_tokens)
        token, expert = permuted_pairs(routing.routing_map, dispatcher_source_rows(self.dispatcher))
        slot = slot_of(routing.routing_map, token, expert)
        index = self._token_index(num_tokens, self.tp_rank, token.device)[token]
        return _place(index, slot, self.my_index * block, k, self.group_size * block * k)

    def _group_token_index(self, num_tokens: int, device) -> torch.Tensor:
        """[group, tokens]: ``_token_index`` of every member of the dispatch group."""
        key = ("group", num_tokens)
        if key not in self._cache:
            rows = [self._token_index(num_tokens, tp_rank, device) for tp_rank in self.member_tp_ranks]
            self._cache[key] = torch.stack(rows)
        return self._cache[key]

    def _shared_at_owner(self, shared, num_tokens: int, owner_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared expert's full-width rows of this rank's tokens and their positions (slot k).

        With sequence parallelism each TP rank holds an F-slice for all the TP group's tokens; one
        all-to-all over TP gives each rank its tokens' full rows (``all_to_all_hp2sp``)."""
        device = shared.device
        samples = [self._sample(num_tokens, r, device) for r in range(self.tp_size)]
        mine = samples[self.tp_rank]
        if mine is not None:  # only the sampled tokens' rows travel (blocks padded to equal size)
            block = self._block(num_tokens)
            pick = [
                torch.nn.functional.pad(s.indices, (0, block - s.size)) + r * num_tokens
                for r, s in enumerate(samples)
                if s is not None
            ]
            shared = shared.index_select(0, torch.cat(pick))
        if self.tp_size > 1:
            shared = all_to_all_hp2sp(shared, group=self.tp_group)
        index = torch.arange(shared.shape[0], device=device)
        positions = index * self.slots + self.k
        if mine is not None:
            dropped = torch.full_like(positions, owner_tokens * self.slots)
            positions = torch.where(index < mine.size, positions, dropped)
        return shared, positions


class Specialization(RegularizerBase):
    """R_sp of every MoE layer of this rank (one probe per layer)."""

    coefficient_field = "moe_specialization_loss_coeff"

    def __init__(self, probes: list[SpecializationProbe], coeff: float):
        self.probes, self.coeff = probes, coeff

    def begin_step(self, plan: StepPlan) -> None:
        for probe in self.probes:
            probe.measure = plan.measure

    def metric_names(self, plan: StepPlan) -> list[str]:
        # between log steps the values stay on the device (no host read); a report averages them
        return ["specialization_loss"] if (self.coeff > 0 and plan.log) or plan.measure else []

    def set_coefficient(self, value: float) -> None:
        self.coeff = value
        for probe in self.probes:
            probe.coeff = value

    def set_max_tokens(self, value: int) -> None:
        """Change ``--moe-specialization-max-tokens`` between steps (0: every token)."""
        for probe in self.probes:
            probe.max_tokens = value
            probe._cache.clear()


def build(ctx: InstallContext) -> Specialization:
    p = ctx.plugin
    include_shared = p.moe_specialization_include_shared_experts
    coeff, max_tokens = p.moe_specialization_loss_coeff, p.moe_specialization_max_tokens
    probes = [
        SpecializationProbe(
            layer,
            coeff=coeff,
            include_shared=include_shared,
            max_tokens=max_tokens,
            gram_kernel=p.moe_specialization_gram_kernel,
            **ctx.recording,
        )
        for layer in ctx.layers
    ]
    return Specialization(probes, coeff)
