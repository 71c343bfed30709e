"""Everything that differs between megatron-core 0.16 and 0.19, in one module.

- MoE layer specs: 0.16 wraps ``MoELayer`` in a ``ModuleSpec``; 0.17+ in ``functools.partial``.
- Experts specs: 0.16 ``ModuleSpec(module=SequentialMLP, ...)``; 0.17+ ``partial(SequentialMLP, ...)``.
- Router builders: 0.17+ pass ``is_mtp_layer`` to the router; 0.16 does not.
- MoE metrics: 0.16 has a dict tracker (``save_to_aux_losses_tracker``/``track_moe_metrics``),
  0.17+ a ``MoEMetricsTracker`` object (``moe_logging.py``).
- Token dispatchers: what R_sp reads of the state a dispatcher computed for its own dispatch
  (split sizes, chunk orders, groups). The attribute names are the same from 0.16 to 0.19; 0.19's
  ``token_combine`` also runs the overlapped shared expert, so only the pieces without side
  effects are reused (``combine_preprocess``, the split sizes).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Any

from megatron.core import package_info
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from packaging.version import Version

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.integration.megatron import patches

MCORE_VERSION = Version(package_info.__version__)
SUPPORTED = (Version("0.16.0"), Version("0.20.0"))


def check_version() -> None:
    low, high = SUPPORTED
    if not (low <= MCORE_VERSION < high):
        raise ConfigError(f"megatron-core {MCORE_VERSION} is not supported; install megatron-core>={low},<{high}")


def is_moe_spec(mlp_spec: Any) -> bool:
    """Whether a layer's ``mlp`` spec builds Megatron's MoELayer (either spec style)."""
    if isinstance(mlp_spec, functools.partial):
        return isinstance(mlp_spec.func, type) and issubclass(mlp_spec.func, MoELayer)
    if isinstance(mlp_spec, ModuleSpec):
        return isinstance(mlp_spec.module, type) and issubclass(mlp_spec.module, MoELayer)
    return False


def moe_submodules(mlp_spec: Any) -> MoESubmodules:
    if isinstance(mlp_spec, functools.partial):
        return mlp_spec.keywords["submodules"]
    return mlp_spec.submodules


def replace_moe_submodules(mlp_spec: Any, **changes: Any) -> Any:
    """A copy of an MoE ``mlp`` spec with ``MoESubmodules`` fields replaced (router, experts, ...)."""
    new_sub = dataclasses.replace(moe_submodules(mlp_spec), **changes)
    if isinstance(mlp_spec, functools.partial):
        return functools.partial(mlp_spec.func, *mlp_spec.args, **{**mlp_spec.keywords, "submodules": new_sub})
    return dataclasses.replace(mlp_spec, submodules=new_sub)


def replace_experts_class(experts_spec: Any, base: type, new_cls: type, **params: Any) -> Any:
    """An experts spec building ``new_cls`` (with extra constructor ``params``) where ``experts_spec``
    builds ``base`` with the same submodules; other experts specs are returned unchanged."""
    if isinstance(experts_spec, functools.partial):
        if experts_spec.func is not base:
            return experts_spec
        return functools.partial(new_cls, *experts_spec.args, **{**experts_spec.keywords, **params})
    if isinstance(experts_spec, ModuleSpec) and experts_spec.module is base:
        return dataclasses.replace(experts_spec, module=new_cls, params={**experts_spec.params, **params})
    return experts_spec


class RouterBuilder:
    """A ``MoESubmodules.router`` builder for ``router_cls`` that accepts every version's kwargs
    (0.17+ pass ``is_mtp_layer``)."""

    def __init__(self, router_cls: type, **bound: Any):
        self.router_cls, self.bound = router_cls, bound

    def __call__(self, *, config: Any, pg_collection: Any = None, **kwargs: Any) -> Any:
        return self.router_cls(config=config, pg_collection=pg_collection, **self.bound, **kwargs)


def router_builder(router_cls: type, **bound: Any) -> RouterBuilder:
    return RouterBuilder(router_cls, **bound)


# --------------------------------------------------------------------------- MoE metric tracker


HAS_METRICS_TRACKER = importlib.util.find_spec("megatron.core.transformer.moe.moe_logging") is not None


def report_megatron_moe_losses(
    *,
    loss_scale: float,
    iteration: int,
    writer,
    track_names: list[str],
    num_layers: int,
    moe_layer_freq,
    per_layer_logging: bool,
) -> dict:
    """Reduce and report Megatron's own MoE losses (load balancing, z-loss) and clear its tracker.

    Returns ``{name: value averaged over MoE layers}``; writes TensorBoard scalars when ``writer``.
    """
    import torch

    totals: dict[str, torch.Tensor] = {}
    if HAS_METRICS_TRACKER:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        get_moe_metrics_tracker().report(
            loss_scale=loss_scale,
            iteration=iteration,
            writer=writer,
            per_layer_logging=per_layer_logging,
            force_initialize=True,
            track_names=track_names,
            num_layers=num_layers,
            moe_layer_freq=moe_layer_freq,
            total_loss_dict=totals,
        )
    else:
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        _average_z_loss_over_tp_dp_cp()
        track_moe_metrics(
            loss_scale=loss_scale,
            iteration=iteration,
            writer=writer,
            total_loss_dict=totals,
            per_layer_logging=per_layer_logging,
            force_initialize=True,
            track_names=track_names,
            num_layers=num_layers,
            moe_layer_freq=moe_layer_freq,
        )
    return {k: float(v) for k, v in totals.items()}


def _average_z_loss_over_tp_dp_cp() -> None:
    """0.16 records ``z_loss`` without a reduction group, so its logged value is one rank's.
    0.17+ averages it over TP x DP x CP; give 0.16 the same group (logging only; patch-table row
    ``compat.z_loss_avg_group``)."""
    from megatron.core import parallel_state

    entry = patches.resolve("compat.z_loss_avg_group")().get("z_loss")
    if entry is not None and entry.get("avg_group") is None:
        entry["avg_group"] = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)


def reset_megatron_moe_tracker() -> None:
    """Forget Megatron's MoE metric entries (their size is fixed by the first model that records)."""
    if HAS_METRICS_TRACKER:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

        destroy_moe_metrics_tracker()
    else:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()


def clear_megatron_moe_tracker() -> None:
    if HAS_METRICS_TRACKER:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        get_moe_metrics_tracker().clear()
    else:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()


# --------------------------------------------------------------------------- token dispatcher state


def dispatcher_kind(dispatcher) -> str:
    """ "alltoall" or "allgather" (the dispatchers whose state R_sp reuses); raises for others."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher

    if isinstance(dispatcher, MoEAlltoAllTokenDispatcher):
        return "alltoall"
    if isinstance(dispatcher, MoEAllGatherTokenDispatcher):
        return "allgather"
    raise ConfigError(
        f"the specialization loss supports --moe-token-dispatcher-type alltoall or allgather, "
        f"not {type(dispatcher).__name__}"
    )


def combine_rows(dispatcher, rows):
    """Rows in the experts' order -> the rows of each source rank's tokens, back on that rank in its
    permuted order (alltoall dispatcher): the dispatcher's own un-sort and tensor-parallel
    reduce-scatter (``combine_preprocess``), then the expert-parallel all-to-all with its split
    sizes (host values the dispatch already read). Differentiable; no host-device synchronization
    beyond the dispatcher's own."""
    from megatron.core.tensor_parallel.mappings import all_to_all

    rows = dispatcher.combine_preprocess(rows)
    return all_to_all(dispatcher.ep_group, rows, dispatcher.input_splits, dispatcher.output_splits)


def start_dispatch_rows(dispatcher, values):
    """A per-row tensor in a source rank's permuted order -> the experts' order, as the dispatch
    moved the tokens (alltoall dispatcher): expert-parallel all-to-all, tensor-parallel gather,
    sort by local expert, with the dispatcher's split sizes. For small integer metadata (no
    gradient). The all-to-all starts now and runs while the caller computes; calling the result
    waits for it and returns the values in the experts' order."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
    from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs

    work, out = None, values
    if dispatcher.ep_group.size() > 1:
        out = values.new_empty(int(sum(dispatcher.output_splits)), *values.shape[1:])
        work = dist.all_to_all_single(
            out,
            values.contiguous(),
            output_split_sizes=dispatcher.output_splits,
            input_split_sizes=dispatcher.input_splits,
            group=dispatcher.ep_group,
            async_op=True,
        )

    def finish():
        rows = out
        if work is not None:
            work.wait()
        if dispatcher.tp_size > 1:
            splits = dispatcher.output_splits_tp
            rows = gather_from_sequence_parallel_region(
                rows, group=dispatcher.tp_group, output_split_sizes=None if splits is None else splits.tolist()
            )
        if dispatcher.num_local_experts > 1:
            rows, _ = sort_chunks_by_idxs(
                rows, dispatcher.num_global_tokens_per_local_expert.ravel(), dispatcher.sort_input_by_local_experts
            )
        return rows

    return finish


def dispatcher_source_rows(dispatcher) -> int:
    """How many rows this rank's tokens sent to the experts (host value, alltoall with EP or TP > 1)."""
    return int(sum(dispatcher.input_splits))
