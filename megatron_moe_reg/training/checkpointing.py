"""dist_checkpointing (torch_dist) save/resume in Megatron-LM's directory layout and state layout.

``{save}/iter_{iteration:07d}/`` holds one checkpoint; ``{save}/latest_checkpointed_iteration.txt``
names the newest. The state is Megatron-LM's (``checkpoint_layout``), so Megatron-LM's ``pretrain()``
resumes from it and this trainer resumes from Megatron-LM's. Model and optimizer state are sharded
tensors keyed by global names (experts by their global index), so a checkpoint loads under other
TP/EP/PP/DP layouts. A checkpoint is written into ``iter_N.partial`` and renamed only once every rank
is done, so an interrupted save never replaces or corrupts an earlier one.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase
from torch.distributed.checkpoint.api import CheckpointException

from megatron_moe_reg.config import PluginConfig
from megatron_moe_reg.errors import ConfigError, RunStopped
from megatron_moe_reg.integration.megatron import patches
from megatron_moe_reg.training import checkpoint_layout as layout
from megatron_moe_reg.training.distributed import print_rank0
from megatron_moe_reg.training.finite import all_finite
from megatron_moe_reg.training.input_checks import TRACKER_FILE, iteration_dir

RNG_KEY = "moe_reg_rng_state"  # every rank's RNG (layout 2); layout 1 kept it under "rng_state"
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
# The plugin options' values in a Megatron-LM checkpoint written without the add-on: their defaults.
PLUGIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PluginConfig)}


def latest_iteration(root: str) -> int | None:
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    return int(text) if text.isdigit() else None


def last_checkpoint(root: str | None) -> Path | None:
    """The iteration folder ``root``'s tracker names, if any."""
    last = latest_iteration(root) if root else None
    return iteration_dir(root, last) if root and last is not None else None


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
# Its sharded tensors, however, are named by global parameter keys and offsets. A checkpoint stores
# the optimizer's own structure (Megatron-LM's layout); loading requests the current optimizer's
# tensors as a flat map, which dist_checkpointing finds by global key and offset whatever layout wrote
# them, and takes only the Adam step from the saved structure.


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


def _optimizer_structure(optimizer, model_sd, is_loading: bool, metadata: dict):
    structure = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
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


def save_checkpoint(ctx, iteration: int, consumed_samples: int) -> Path:
    """Write the model, optimizer, scheduler, RNG and run state of ``iteration`` under ``--save``."""
    root = ctx.cfg.ckpt.save
    if not all_finite(ctx.gpt_model):
        raise RunStopped(
            f"iteration {iteration}: the model's weights are not finite; no checkpoint written (last good: "
            f"{last_checkpoint(root) or 'none'})"
        )
    patches.prepare_checkpoint_writer()  # its helper server ends with this rank
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    cfg = ctx.cfg
    model_sd = ctx.gpt_model.sharded_state_dict()
    metadata = layout.content_metadata(bool(cfg.parallel.use_distributed_optimizer))
    padded_vocab = ctx.gpt_model.vocab_size
    state: dict[str, Any] = {
        "args": layout.megatron_lm_args(cfg, iteration, consumed_samples, padded_vocab),
        "checkpoint_version": layout.MEGATRON_LM_CHECKPOINT_VERSION,
        "iteration": iteration,
        "model": model_sd,
        "optimizer": ctx.optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=metadata),
        "opt_param_scheduler": ctx.scheduler.state_dict(),
        "rng_state": layout.megatron_lm_rng_object(),
        "num_floating_point_operations_so_far": 0,
        RNG_KEY: layout.per_rank_rng_object(RNG_KEY, layout.rng_state()),
        "moe_reg_layout": layout.LAYOUT,
        "consumed_train_samples": consumed_samples,
        "moe_reg_config": cfg.to_dict(),
        "parallel_layout": _parallel_layout(cfg),
    }
    try:
        dist_checkpointing.save(state, str(partial), content_metadata=metadata)
    except (Exception, CheckpointException) as e:  # torch's writer gathers the ranks' failures (a BaseException)
        reason = _write_failure(e)
        if reason is None:
            raise
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise RunStopped(
            f"iteration {iteration}: writing the checkpoint to {partial} failed ({reason}); the last checkpoint, "
            f"{last_checkpoint(root) or 'none'}, is intact: free space or choose "
            f"another --save, and resume with --load {root}"
        ) from None
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


WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EFBIG)


def _write_failure(error: BaseException) -> str | None:
    """The file-system error behind a failed save (directly, chained, or in the text of torch's gathered
    per-rank failures), as its message; None for any other failure."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRORS:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    return next((os.strerror(code) for code in WRITE_ERRORS if os.strerror(code) in text), None)


def _check_architecture(saved: dict, cfg, path: Path) -> None:
    if not saved:  # no options recorded: nothing to compare
        return
    current = cfg.to_dict()
    megatron_lm = saved.get("megatron_lm", False)  # Megatron-LM's args: the plugin's keys only with the add-on
    for group, keys in ARCHITECTURE_KEYS.items():
        for key in keys:
            new = current[group][key]
            old = saved.get(group, {}).get(key)
            if megatron_lm and key not in saved[group]:
                if group != "plugin":  # a name this Megatron-LM version does not have
                    continue
                old = PLUGIN_DEFAULTS[key]  # written by Megatron-LM without the add-on: its own router
            if key == "kv_channels" and old is None:  # layout 1 left it to TransformerConfig: hidden / heads
                old = saved[group]["hidden_size"] // saved[group]["num_attention_heads"]
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


def _saved_layout(common: dict) -> dict:
    """The parallel layout that wrote a checkpoint: ours, or read from Megatron-LM's ``args``."""
    if "parallel_layout" in common:
        return common["parallel_layout"]
    args = common.get("args")
    tp = getattr(args, "tensor_model_parallel_size", 1)
    return {
        "world_size": getattr(args, "world_size", None),
        "tp": tp,
        "pp": getattr(args, "pipeline_model_parallel_size", 1),
        "ep": getattr(args, "expert_model_parallel_size", 1),
        "etp": getattr(args, "expert_tensor_parallel_size", None) or tp,
        "cp": getattr(args, "context_parallel_size", 1),
    }


def _optimizer_request(ctx, model_sd, common: dict, version: int, path: Path):
    """The current optimizer's structure and its tensors as a flat request; the sharding metadata is
    the checkpoint's (Megatron-LM's ``content_metadata``), so bucket-space formats find their keys."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    use_distributed = bool(ctx.cfg.parallel.use_distributed_optimizer)
    if version == 1:
        metadata = layout.LAYOUT_1_OPTIMIZER_METADATA
    else:
        metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
        metadata = metadata or layout.content_metadata(use_distributed)
    kind = metadata.get("distrib_optim_sharding_type")
    if (
        kind
        and kind not in DistributedOptimizer.checkpoint_fully_reshardable_formats
        and not (use_distributed and _saved_layout(common) == _parallel_layout(ctx.cfg))
    ):
        raise ConfigError(
            f"--load {path}: its optimizer state is the distributed optimizer's '{kind}' format, which only the "
            f"layout that wrote it reads ({_saved_layout(common)} with --use-distributed-optimizer); use "
            "--no-load-optim to load the rest, or save with Megatron-LM's --dist-ckpt-optim-fully-reshardable"
        )
    structure, leaves = _optimizer_structure(ctx.optimizer, model_sd, is_loading=True, metadata=metadata)
    return structure, leaves, {"tensors": {str(i): leaf for i, (_, leaf) in enumerate(leaves)}}


def _rng_request(ctx, common: dict, version: int) -> tuple[str | None, Any]:
    """(key, request) of the RNG state this run can restore: every rank's own state when the layout
    is the same; Megatron-LM's (PP, TP) state when TP and PP are; else none."""
    saved = _saved_layout(common)
    same_layout = saved == _parallel_layout(ctx.cfg)
    if version == 1:
        return ("rng_state", layout.per_rank_rng_object("rng_state", None)) if same_layout else (None, None)
    if same_layout and "moe_reg_config" in common:
        return RNG_KEY, layout.per_rank_rng_object(RNG_KEY, None)
    if (saved["tp"], saved["pp"]) == (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
    ):
        return "rng_state", layout.megatron_lm_rng_object()
    return None, None


def _check_readable(path: Path) -> None:
    """megatron-core 0.19 keeps a checkpoint's common state inside its torch_dist files; older releases
    read only ``common.pt``."""
    from megatron_moe_reg.integration.megatron import compat

    if not (path / "common.pt").is_file() and (path / ".metadata").is_file() and compat.MCORE_VERSION.release < (0, 19):
        raise ConfigError(
            f"--load {path}: written by megatron-core 0.19 or newer (no common.pt); megatron-core "
            f"{compat.MCORE_VERSION} cannot read it: load it with megatron-core 0.19+"
        )


def load_checkpoint(ctx) -> tuple[int, int]:
    """Load ``--load`` (its latest iteration, or ``--ckpt-step``) into the model (and optimizer,
    scheduler, RNG): a checkpoint of this trainer (either layout) or of Megatron-LM's.
    Returns (iteration, consumed)."""
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
    _check_readable(path)
    common = dist_checkpointing.load_common_state_dict(str(path))
    version = layout.layout_of(common)
    _check_architecture(layout.saved_options(common), ctx.cfg, path)

    model_sd = ctx.gpt_model.sharded_state_dict()
    restarted = _drop_restartable(model_sd, path)
    request: dict[str, Any] = {"model": model_sd}
    load_optim = not (ck.no_load_optim or ck.finetune)
    if load_optim:
        structure, leaves, request["optimizer"] = _optimizer_request(ctx, model_sd, common, version, path)
    rng_key, rng_request = (None, None) if (ck.no_load_rng or ck.finetune) else _rng_request(ctx, common, version)
    if rng_key is not None:
        request[rng_key] = rng_request
    elif not (ck.no_load_rng or ck.finetune):
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
        step = float(common["optimizer"]["step"]) if version == 1 else _optimizer_step(common["optimizer"])
        if step == 0 and common["iteration"] > 0:  # Megatron-LM's distributed optimizer without Apex / TE
            step = float(common["iteration"])
            print_rank0(f"note: the checkpoint holds no Adam step; set to its iteration ({step:.0f})")
        _set_optimizer_step(structure, step)
        ctx.optimizer.load_state_dict(structure)
        scheduler = common["opt_param_scheduler"]
        if version == 1:  # counted in steps then, in samples now
            batch = common["moe_reg_config"]["train"]["global_batch_size"]
            scheduler = layout.scheduler_from_layout_1(scheduler, batch)
        ctx.scheduler.load_state_dict(scheduler)
    else:
        ctx.optimizer.reload_model_params()
    if rng_key is not None:
        saved_rng = state[rng_key].data if hasattr(state[rng_key], "data") else state[rng_key]
        if rng_key == "rng_state" and version == 1:
            saved_rng = layout.rng_from_layout_1(saved_rng)
        elif rng_key == "rng_state":
            saved_rng = layout.from_megatron_lm_rng(saved_rng)
        layout.set_rng_state(saved_rng)
    print_rank0(f"loaded checkpoint {path}" + ("" if "moe_reg_config" in common else " (written by Megatron-LM)"))
    if ck.finetune:
        return 0, 0
    consumed = common.get("consumed_train_samples", getattr(common.get("args"), "consumed_train_samples", 0))
    return int(common["iteration"]), int(consumed)


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
