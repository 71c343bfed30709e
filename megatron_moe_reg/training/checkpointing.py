"""dist_checkpointing (torch_dist) save/resume in Megatron-LM's directory layout.

``{save}/iter_{iteration:07d}/`` holds one checkpoint; ``{save}/latest_checkpointed_iteration.txt``
names the newest. Model and optimizer state are sharded tensors keyed by global names
(experts by their global index), so a checkpoint loads under other TP/EP/PP/DP layouts.
A checkpoint is written into ``iter_N.partial`` and renamed only once every rank is done,
so an interrupted save never replaces or corrupts an earlier one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.training.distributed import print_rank0

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# Options that must match between the checkpoint and the run that loads it.
ARCHITECTURE_KEYS = {
    "model": (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "ffn_hidden_size",
        "kv_channels",
        "normalization",
        "swiglu",
        "add_bias_linear",
        "position_embedding_type",
        "untie_embeddings_and_output_weights",
    ),
    "moe": ("num_experts", "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_expert_intermediate_size"),
    "plugin": ("moe_router_type", "moe_eigen_rank"),
}
# Model state that may be absent from a checkpoint and is rebuilt: power-iteration vectors (written
# only by runs whose routers used σ_max; re-estimated from the weights at the next step).
RESTARTABLE_SUFFIXES = (".power_u", ".power_v")


def iteration_dir(root: str, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str) -> int | None:
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    return int(text) if text.isdigit() else None


def _parallel_layout(cfg) -> dict:
    p = cfg.parallel
    return {
        "world_size": cfg.world_size,
        "tp": p.tensor_model_parallel_size,
        "pp": p.pipeline_model_parallel_size,
        "ep": p.expert_model_parallel_size,
        "etp": p.expert_tensor_parallel_size,
        "cp": p.context_parallel_size,
    }


# ----------------------------------------------------------------------------- optimizer state
#
# Megatron's optimizer state dict has a layout-specific structure: at EP=1 expert weights are
# ordinary data-parallel parameters (one optimizer); at EP>1 they get their own optimizer
# (a ChainedOptimizer), and the distributed optimizer nests everything differently again.
# Its sharded tensors, however, are named by global parameter keys and offsets. The checkpoint
# therefore stores only those tensors (a flat map with no layout-specific structure) and the
# Adam step; loading requests the current optimizer's own tensors, which dist_checkpointing
# finds by global key and offset whatever layout wrote them.


def _walk(node: Any, path: tuple = ()):
    """Yield (path, value) for the leaves of nested dicts/lists."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))
    else:
        yield path, node


def _set_path(node: Any, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _optimizer_structure(optimizer, model_sd, is_loading: bool):
    structure = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    leaves = [(path, v) for path, v in _walk(structure) if isinstance(v, ShardedBase)]
    return structure, leaves


def _torch_optimizer_dicts(node: Any):
    """The torch-optimizer-style dicts (with 'state' and 'param_groups') inside a structure."""
    if isinstance(node, dict):
        if "param_groups" in node:
            yield node
        for v in node.values():
            yield from _torch_optimizer_dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _torch_optimizer_dicts(v)


def _optimizer_step(structure) -> float:
    """Adam's step: ``state['common_step']`` (Megatron's plain and mixed-precision optimizers)
    or ``param_groups[i]['step']`` (the distributed optimizer)."""
    steps = []
    for d in _torch_optimizer_dicts(structure):
        steps += [float(g["step"]) for g in d["param_groups"] if "step" in g]
        state = d.get("state")
        if isinstance(state, dict) and "common_step" in state:
            steps.append(float(state["common_step"]))
    return max(steps, default=0.0)


def _set_optimizer_step(structure, step: float) -> None:
    for d in _torch_optimizer_dicts(structure):
        groups = d["param_groups"]
        if any("step" in g for g in groups):
            for g in groups:
                g["step"] = step
        else:
            d.setdefault("state", {})["common_step"] = torch.tensor(step)


def _optimizer_checkpoint(optimizer, model_sd) -> dict:
    structure, leaves = _optimizer_structure(optimizer, model_sd, is_loading=False)
    return {"tensors": {str(i): leaf for i, (_, leaf) in enumerate(leaves)}, "step": _optimizer_step(structure)}


def _get_path(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object() -> ShardedObject:
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)


def save_checkpoint(ctx, iteration: int, consumed_samples: int) -> Path:
    """Write the model, optimizer, scheduler, RNG and run state of ``iteration`` under ``--save``."""
    root = ctx.cfg.ckpt.save
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    model_sd = ctx.gpt_model.sharded_state_dict()
    state: dict[str, Any] = {
        "model": model_sd,
        "optimizer": _optimizer_checkpoint(ctx.optimizer, model_sd),
        "rng_state": _rng_sharded_object(),
        "opt_param_scheduler": ctx.scheduler.state_dict(),
        "iteration": iteration,
        "consumed_train_samples": consumed_samples,
        "checkpoint_version": CHECKPOINT_VERSION,
        "moe_reg_config": ctx.cfg.to_dict(),
        "parallel_layout": _parallel_layout(ctx.cfg),
    }
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        tmp = Path(root) / (TRACKER_FILE + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, Path(root) / TRACKER_FILE)
    dist.barrier()
    print_rank0(f"saved checkpoint at iteration {iteration} to {final}")
    return final


def _check_architecture(saved: dict, cfg, path: Path) -> None:
    if not saved:  # written without this package (e.g. by Megatron-LM): nothing to compare
        return
    current = cfg.to_dict()
    for group, keys in ARCHITECTURE_KEYS.items():
        for key in keys:
            old, new = saved.get(group, {}).get(key), current[group][key]
            if key == "num_query_groups":  # what counts: the groups of grouped-query attention, if on
                old = old if saved.get(group, {}).get("group_query_attention") else None
                new = new if current[group]["group_query_attention"] else None
            if old != new:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(
                    f"--load {path}: the checkpoint was written with {flag} {old}, this run "
                    f"has {new}; use the checkpoint's value"
                )


def _drop_restartable(model_sd: dict, path: Path) -> list[str]:
    """Remove from ``model_sd`` the restartable entries the checkpoint lacks; any other missing
    tensor means the checkpoint was written by a different model."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    available = set(dist_checkpointing.load_tensors_metadata(str(path)))
    dropped = []
    for name, value in list(model_sd.items()):
        if not isinstance(value, ShardedTensor):
            continue
        key = value.key
        if key in available or key.endswith("_extra_state"):
            continue
        if not key.endswith(RESTARTABLE_SUFFIXES):
            raise ConfigError(
                f"--load {path}: the checkpoint has no '{key}'; it was written by a model with "
                "other modules (router type, shared experts, ...)"
            )
        dropped.append(name)
        del model_sd[name]
    return dropped


def load_checkpoint(ctx) -> tuple[int, int]:
    """Load ``--load`` (its latest iteration, or ``--ckpt-step``) into the model (and optimizer,
    scheduler, RNG). Returns (iteration, consumed)."""
    ck = ctx.cfg.ckpt
    iteration = latest_iteration(ck.load) if ck.ckpt_step is None else ck.ckpt_step
    if ck.ckpt_step is not None and not iteration_dir(ck.load, ck.ckpt_step).is_dir():
        raise ConfigError(f"--ckpt-step {ck.ckpt_step}: {iteration_dir(ck.load, ck.ckpt_step)} not found")
    if iteration is None:
        if ck.load == ck.save:  # resuming into the same directory: nothing written yet
            print_rank0(f"no checkpoint in {ck.load}; starting from scratch")
            return 0, 0
        raise ConfigError(f"--load {ck.load}: no {TRACKER_FILE} found (not a checkpoint directory)")
    path = iteration_dir(ck.load, iteration)
    common = dist_checkpointing.load_common_state_dict(str(path))
    _check_architecture(common.get("moe_reg_config", {}), ctx.cfg, path)

    model_sd = ctx.gpt_model.sharded_state_dict()
    restarted = _drop_restartable(model_sd, path)
    request: dict[str, Any] = {"model": model_sd}
    load_optim = not (ck.no_load_optim or ck.finetune)
    if load_optim:
        structure, leaves = _optimizer_structure(ctx.optimizer, model_sd, is_loading=True)
        request["optimizer"] = {"tensors": {str(i): leaf for i, (_, leaf) in enumerate(leaves)}}
    same_layout = common.get("parallel_layout") == _parallel_layout(ctx.cfg)
    load_rng = not (ck.no_load_rng or ck.finetune) and same_layout
    if load_rng:
        request["rng_state"] = _rng_sharded_object()
    elif not same_layout:
        print_rank0("checkpoint was written with another parallel layout: RNG state not restored")
    state = dist_checkpointing.load(request, str(path))
    result = ctx.gpt_model.load_state_dict(state["model"], strict=not restarted)
    if restarted:
        assert set(result.missing_keys) <= set(restarted) and not result.unexpected_keys, result
        print_rank0(
            f"note: {len(restarted)} power-iteration vectors are not in the checkpoint; "
            "they start afresh from the loaded weights"
        )
    if load_optim:
        loaded = state["optimizer"]
        for i, (where, _) in enumerate(leaves):
            _set_path(structure, where, loaded["tensors"][str(i)])
        for where, value in list(_walk(structure)):
            if isinstance(value, LocalNonpersistentObject):  # kept locally, never saved
                _set_path(structure, where, value.unwrap())
        _set_optimizer_step(structure, loaded["step"])
        ctx.optimizer.load_state_dict(structure)
        ctx.scheduler.load_state_dict(common["opt_param_scheduler"])
    else:
        ctx.optimizer.reload_model_params()
    if load_rng:
        _set_rng_state(state["rng_state"].data if hasattr(state["rng_state"], "data") else state["rng_state"])
    print_rank0(f"loaded checkpoint {path}")
    if ck.finetune:
        return 0, 0
    return int(common["iteration"]), int(common["consumed_train_samples"])


def resolve_iteration_dir(path: str) -> Path:
    """A checkpoint root (with the tracker file) or one ``iter_N`` directory -> the ``iter_N`` dir."""
    p = Path(path)
    iteration = latest_iteration(path)
    if iteration is not None:
        return iteration_dir(path, iteration)
    if (p / "metadata.json").is_file():
        return p
    raise ConfigError(f"{path}: not a checkpoint (no {TRACKER_FILE} and no metadata.json)")


def read_model_tensors(path: str) -> dict[str, torch.Tensor]:
    """All model tensors of a checkpoint as full (unsharded) CPU tensors, whatever layout wrote it.

    Works in a plain process: a single-rank gloo group is created when none exists.
    """
    from megatron_moe_reg.training.distributed import init_process_group

    init_process_group("gloo")
    tensors = dist_checkpointing.load_plain_tensors(str(resolve_iteration_dir(path)))
    return {k: v for k, v in tensors.items() if torch.is_tensor(v) and not k.startswith("optimizer.")}
