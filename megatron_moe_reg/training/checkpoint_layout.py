"""Megatron-LM's torch_dist checkpoint layout, written and read by ``moe-reg pretrain``.

A checkpoint holds what ``megatron.training.checkpointing.generate_state_dict`` writes, so a run can
continue in either trainer:

- ``args``: a Megatron-LM argument namespace (flag names as attributes, plus ``consumed_train_samples``,
  ``world_size``, ``data_parallel_size``, ``padded_vocab_size``), ``checkpoint_version`` 3.0, ``iteration``;
- ``model``: the model's sharded state dict; ``optimizer``: the optimizer's own sharded state dict;
- ``opt_param_scheduler``: Megatron-LM's scheduler, counted in samples;
- ``rng_state``: one state per (PP, TP) rank, DP rank 0 saving it (Megatron-LM's form);
- the content metadata Megatron-LM reads back to build its optimizer's request.

Added keys, which Megatron-LM ignores: ``moe_reg_config`` (the run's options, for the architecture
check), ``parallel_layout``, ``consumed_train_samples`` and ``moe_reg_rng_state`` (every rank's RNG: under
EP, data-parallel ranks hold different expert RNG streams, which a (PP, TP) state cannot restore).

Layout 1 (``moe-reg pretrain`` before this layout) stored the optimizer as a flat map of its tensors
plus the Adam step, every rank's RNG under ``rng_state`` and a scheduler counted in steps; it loads.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

MEGATRON_LM_CHECKPOINT_VERSION = 3.0
LAYOUT = 2  # ``moe_reg_layout`` of checkpoints written now; absent with ``args`` = Megatron-LM's trainer
LAYOUT_1_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# Scheduler entries counted in steps by layout 1, in samples (steps x global batch) now.
SCHEDULER_STEP_COUNTS = (
    "num_steps",
    "warmup_steps",
    "lr_warmup_steps",
    "decay_steps",
    "lr_decay_steps",
    "wd_incr_steps",
    "wsd_decay_steps",
)


def layout_of(common: dict) -> int:
    """1 or 2 (this layout, by either trainer)."""
    if "args" in common or common.get("moe_reg_layout") == LAYOUT:
        return LAYOUT
    return 1


def content_metadata(use_distributed_optimizer: bool) -> dict:
    """Megatron-LM's ``_build_sharded_state_dict_metadata`` for a run with
    ``--dist-ckpt-optim-fully-reshardable`` (model-space optimizer state: loads under any layout)."""
    metadata: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    return metadata


def megatron_lm_args(cfg, iteration: int, consumed: int, padded_vocab_size: int) -> argparse.Namespace:
    """The run's options as Megatron-LM's argument namespace (the flags we share have its names)."""
    values: dict[str, Any] = {}
    for group in cfg.to_dict().values():
        values.update(group)
    values.update(
        world_size=cfg.world_size,
        data_parallel_size=cfg.data_parallel_size,
        global_batch_size=cfg.global_batch_size,
        lr_decay_iters=cfg.lr_decay_iters,
        iteration=iteration,
        consumed_train_samples=consumed,
        skipped_train_samples=0,
        consumed_valid_samples=0,
        padded_vocab_size=padded_vocab_size,
        add_position_embedding=True,  # Megatron-LM's --no-position-embedding is not an option here
        use_dist_ckpt=True,
        no_save_optim=False,
        no_save_rng=False,
        data_parallel_random_init=False,
        num_floating_point_operations_so_far=0,
    )
    return argparse.Namespace(**values)


def rng_state() -> dict:
    """This rank's generators, with Megatron-LM's keys (``cuda_rng_state`` is the CPU state on CPU,
    as the CPU runtime layer gives Megatron-LM)."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state(),
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def rng_from_layout_1(state: dict) -> dict:
    converted = {
        "random_rng_state": state["random"],
        "np_rng_state": state["np"],
        "torch_rng_state": state["torch"],
        "rng_tracker_states": state["tracker"],
    }
    converted["cuda_rng_state"] = state.get("cuda", state["torch"])
    return converted


def megatron_lm_rng_object() -> ShardedObject:
    """``rng_state`` as Megatron-LM's ``get_rng_state`` shards it: by (PP, TP), DP replicas."""
    return ShardedObject(
        "rng_state",
        [rng_state()],
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def per_rank_rng_object(key: str, state: Any) -> ShardedObject:
    import torch.distributed as dist

    return ShardedObject(key, state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def from_megatron_lm_rng(states: list) -> dict:
    """This rank's entry of Megatron-LM's list (one per DP rank with --data-parallel-random-init)."""
    dp_rank = ps.get_data_parallel_rank()
    return states[dp_rank] if len(states) > dp_rank else states[0]


def scheduler_from_layout_1(state: dict, global_batch_size: int) -> dict:
    return {k: v * global_batch_size if k in SCHEDULER_STEP_COUNTS and v is not None else v for k, v in state.items()}


def saved_options(common: dict) -> dict:
    """The options a checkpoint was written with, by group: ``moe_reg_config``, or for Megatron-LM's
    trainer its ``args`` under every group (the architecture check reads names it knows)."""
    if "moe_reg_config" in common:
        return common["moe_reg_config"]
    args = common.get("args")
    if args is None:
        return {}
    values = vars(args)
    return {"model": values, "moe": values, "plugin": values, "megatron_lm": True}
