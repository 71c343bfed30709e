"""Every attribute of torch, megatron-core or Megatron-LM that the plugin replaces, in one table.

A row names its target (``module:attribute.path``), the megatron-core versions it applies to,
why it is needed, and when it is applied (``scope``):

- ``cpu``: by the CPU runtime layer (``cpu_runtime.activate``), only when CUDA is absent, for the
  life of the process;
- ``megatron-core``: megatron-core's own defects that appear on any machine (without
  TransformerEngine, say), by ``fix_megatron_core`` (both drivers and the CPU runtime layer), for the
  life of the process;
- ``megatron-lm``: while the add-on runs Megatron-LM's ``pretrain`` (``replaced``), restored after;
- ``megatron-lm-cpu``: Megatron-LM's initialize path without CUDA, while the add-on runs it on a CPU;
- ``training``: while ``moe-reg pretrain``'s optimizer step runs (``replaced``), restored after;
- ``routing``: while a plugin router's ``routing`` runs, when its flag is on (``replaced``);
- ``data``: while the datasets are built;
- ``compat``: Megatron state that ``compat`` edits in place when it reports;
- ``checkpoint``: before a process's first torch_dist save, by either driver
  (``prepare_checkpoint_writer``), for the life of the process.

``kind``: ``replace`` (the attribute exists and is replaced), ``define`` (the attribute is missing
in those versions and is defined) or ``mutate`` (an object reached through the target is edited).
``source``: where the target's module comes from — the megatron-core package, Megatron-LM's own
packages (``megatron.training``, ``megatron.legacy``: in a checkout, and ``megatron.training`` in
megatron-core wheels from 0.19), or the scripts of a Megatron-LM checkout (``gpt_builders.py``).
``unresolved_targets`` lists the rows in range whose target is missing, so a test fails when a row
would silently do nothing.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from packaging.version import Version

from megatron_moe_reg.integration.megatron import child_processes
from megatron_moe_reg.integration.megatron import host_device as host

SOURCES = ("megatron-core", "megatron-lm", "megatron-lm-checkout")


@dataclass(frozen=True)
class Patch:
    key: str  # short name the code uses to apply or resolve the row
    target: str  # "module:attribute.path"
    versions: str  # megatron-core minor versions, "0.16" or "0.16-0.19"
    reason: str
    scope: str  # "cpu" | "megatron-core" | "megatron-lm" | "megatron-lm-cpu" | "training" | "routing" | "data"
    #             | "compat" | "checkpoint"
    make: Callable[[Any], Any] | None = None  # original -> replacement (cpu rows); None: given at apply time
    kind: str = "replace"  # "replace" | "define" | "mutate"
    source: str = "megatron-core"

    def applies_to(self, version: Version) -> bool:
        low, _, high = self.versions.partition("-")
        minor = Version(f"{version.major}.{version.minor}")
        return Version(low) <= minor <= Version(high or low)

    def owner_and_name(self) -> tuple[Any, str]:
        """The object holding the attribute, and its name (imports the module)."""
        module_name, attr = self.target.split(":")
        owner: Any = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner, name


def _const(value: Any) -> Callable[[Any], Any]:
    return lambda _original: value


def _cpu(
    key: str, target: str, reason: str, make: Callable[[Any], Any], versions: str = "0.16-0.19", kind: str = "replace"
) -> Patch:
    return Patch(key, target, versions, reason, "cpu", make, kind)


def _lm_cpu(
    key: str,
    target: str,
    reason: str,
    make: Callable[[Any], Any],
    versions: str = "0.16-0.19",
    source: str = "megatron-lm",
) -> Patch:
    return Patch(key, target, versions, reason, "megatron-lm-cpu", make, source=source)


_FACTORIES = (
    "zeros",
    "ones",
    "empty",
    "full",
    "tensor",
    "arange",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "randn",
    "rand",
    "randint",
    "as_tensor",
)

PATCHES: tuple[Patch, ...] = (
    # ---------------------------------------------------------------- CPU runtime (no CUDA)
    _cpu(
        "cpu.current_device",
        "torch.cuda:current_device",
        "buffers and router weights are placed on torch.cuda.current_device()",
        _const(torch.cpu.current_device),
    ),
    _cpu(
        "cpu.current_stream",
        "torch.cuda:current_stream",
        "DDP grad sync and the alltoall dispatcher wait on the current stream",
        _const(host.current_stream),
    ),
    _cpu(
        "cpu.Stream",
        "torch.cuda:Stream",
        "MoEAlltoAllTokenDispatcher creates a device-to-host side stream",
        _const(host.HostStream),
    ),
    _cpu(
        "cpu.Event",
        "torch.cuda:Event",
        "the alltoall dispatcher and DDP record events on side streams",
        _const(host.HostEvent),
    ),
    _cpu(
        "cpu.stream",
        "torch.cuda:stream",
        "side-stream context managers in the alltoall dispatcher",
        _const(torch.cpu.stream),
    ),
    _cpu(
        "cpu.synchronize",
        "torch.cuda:synchronize",
        "dist_checkpointing and the schedules synchronize the device",
        _const(host.host_synchronize),
    ),
    _cpu(
        "cpu.get_rng_state",
        "torch.cuda:get_rng_state",
        "the RNG tracker snapshots the device generator; on CPU that is the CPU generator",
        _const(host.cpu_rng_get),
    ),
    _cpu(
        "cpu.manual_seed",
        "torch.cuda:manual_seed",
        "model_parallel_cuda_manual_seed seeds the device generator",
        _const(host.cpu_manual_seed),
    ),
    _cpu(
        "cpu.nvtx_push",
        "torch.cuda.nvtx:range_push",
        "nvtx ranges raise on CPU-only torch builds",
        _const(host.nvtx_noop),
    ),
    _cpu(
        "cpu.nvtx_pop",
        "torch.cuda.nvtx:range_pop",
        "nvtx ranges raise on CPU-only torch builds",
        _const(host.nvtx_noop),
    ),
    _cpu(
        "cpu.is_current_stream_capturing",
        "torch.cuda:is_current_stream_capturing",
        "the router tracer (--moe-routing-trace-path) skips calls made while a CUDA graph is captured; "
        "the query raises on CPU-only torch builds",
        _const(host.no_graph_capture),
        versions="0.19",
    ),
    _cpu(
        "cpu.get_cuda_rng_state",
        "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
        "RNG tracker fork and activation recompute read the device RNG state",
        _const(host.cpu_rng_get),
    ),
    _cpu(
        "cpu.set_cuda_rng_state",
        "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
        "RNG tracker fork and activation recompute restore the device RNG state",
        _const(host.cpu_rng_set),
    ),
    _cpu(
        "cpu.rng_tracker",
        "megatron.core.tensor_parallel.random:_CUDA_RNG_STATE_TRACKER",
        "Megatron's RNG tracker keeps CUDA generator states; on CPU the same tracker on CPU states",
        host.cpu_rng_tracker,
    ),
    _cpu(
        "cpu.rng_tracker_initialized",
        "megatron.core.tensor_parallel.random:_CUDA_RNG_STATE_TRACKER_INITIALIZED",
        "get_cuda_rng_tracker would replace the CPU tracker on first use",
        _const(True),
    ),
    _cpu(
        "cpu.host_copy",
        "megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu",
        "alltoall split sizes stay tensors on CPU; gloo's all_to_all_single wants int lists",
        host.host_copy,
    ),
    _cpu(
        "cpu.tensor_cuda",
        "torch:Tensor.cuda",
        "optimizer, dist-optimizer and broadcast helpers call tensor.cuda()",
        host.tensor_cuda,
    ),
    _cpu(
        "cpu.tensor_type",
        "torch:Tensor.type",
        "optimizers and grad clipping assert dtypes as 'torch.cuda.<T>Tensor' strings",
        host.tensor_type,
    ),
    _cpu(
        "cpu.tensor_to",
        "torch:Tensor.to",
        "rotary embeddings and routers move tensors to the CUDA device",
        host.tensor_to,
    ),
    *(
        _cpu(
            f"cpu.factory.{name}",
            f"torch:{name}",
            'schedules, optimizer, clip_grads and the MoE tracker allocate with device="cuda"',
            host.redirect_device_kwarg,
        )
        for name in _FACTORIES
    ),
    # ---------------------------------------------------------------- megatron-core itself, on any machine
    Patch(
        "megatron-core.te_general_gemm",
        "megatron.core.transformer.moe.moe_utils:te_general_gemm",
        "0.16",
        "every TopKRouter's gating calls router_gating_linear, which references te_general_gemm, a name "
        "0.16 defines only when TransformerEngine imports (NameError on a GPU or CPU without it)",
        "megatron-core",
        _const(None),
        kind="define",
    ),
    # ---------------------------------------------------------------- checkpoint writer (before the first save)
    Patch(
        "checkpoint.write-results-queue",
        "megatron.core.dist_checkpointing.strategies.filesystem_async:_results_queue",
        "0.16-0.19",
        "the torch_dist writer's results queue lives in a Manager server per rank, which outlived a rank "
        "killed by a signal (the OOM killer, a scheduler); this one ends with its rank (child_processes)",
        "checkpoint",
        lambda original: original if original is not None else child_processes.queue_ending_with_parent(),
    ),
    # ---------------------------------------------------------------- Megatron-LM add-on (during pretrain)
    Patch(
        "megatron-lm.block-spec",
        "gpt_builders:get_gpt_decoder_block_spec",
        "0.16-0.18",
        "gpt_builder builds the decoder spec from Megatron-LM's config inside the model provider; the "
        "plugin router and grouped-GEMM experts are swapped into that spec",
        "megatron-lm",
        source="megatron-lm-checkout",
    ),
    Patch(
        "megatron-lm.block-spec-builder",
        "megatron.training.models.gpt:get_gpt_decoder_block_spec",
        "0.19",
        "the GPT model builder of the config-container path (0.19's pretrain_gpt.py) builds the decoder "
        "spec; the plugin router and grouped-GEMM experts are swapped into that spec",
        "megatron-lm",
        source="megatron-lm",
    ),
    Patch(
        "megatron-lm.setup_model",
        "megatron.training.training:setup_model_and_optimizer",
        "0.16-0.19",
        "the losses and measurements are installed on the model chunks Megatron-LM builds, wraps and loads "
        "(through get_model or the 0.19 model builder)",
        "megatron-lm",
        source="megatron-lm",
    ),
    Patch(
        "megatron-lm.train_step",
        "megatron.training.training:train_step",
        "0.16-0.19",
        "each step begins and ends the plugin's step (measurements at log-interval steps) and reports",
        "megatron-lm",
        source="megatron-lm",
    ),
    Patch(
        "megatron-lm.compile-helpers",
        "megatron.core.datasets.utils:compile_helpers",
        "0.16-0.19",
        "Megatron-LM's initialize runs make for the dataset helper, which pip wheels ship compiled but "
        "without a Makefile (make fails, and Megatron-LM exits, on any machine); skipped when the compiled "
        "helper imports",
        "megatron-lm",
        host.skip_when_helpers_import,
    ),
    Patch(
        "megatron-lm.dist-optimizer-load",
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.sharded_state_dict",
        "0.16-0.19",
        "without Apex or TransformerEngine, loading a distributed-optimizer checkpoint asks for the Adam "
        "step before any step created it (assert len(steps) == 1); the states are created first",
        "megatron-lm",
        host.optimizer_states_before_load,
    ),
    Patch(
        "megatron-lm.dist-optimizer-load-state",
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
        "0.16-0.19",
        "with fp32 parameters the main parameters are views of the model's and Megatron-LM loads the state "
        "outside no_grad (in-place copy into a leaf that requires grad); without Apex or TE every parameter "
        "gets one shared Adam step tensor, which torch's Adam increments once per parameter",
        "megatron-lm",
        host.optimizer_state_load,
    ),
    # ---------------------------------------------------------------- Megatron-LM's initialize path without CUDA
    _lm_cpu(
        "lm-cpu.initialize_megatron",
        "megatron.training.training:initialize_megatron",
        "pretrain() calls initialize_megatron without allow_no_cuda, which asserts 'Megatron requires CUDA'",
        host.allow_no_cuda,
    ),
    _lm_cpu(
        "lm-cpu.initialize_distributed",
        "megatron.training.initialize:_initialize_distributed",
        "it creates the model-parallel groups only when torch.cuda.device_count() > 0; while it runs, one "
        "device is counted and set_device does nothing",
        host.one_visible_device,
    ),
    _lm_cpu(
        "lm-cpu.set_random_seed",
        "megatron.training.initialize:_set_random_seed",
        "it seeds the model-parallel RNG tracker only when a device is counted; the same one-device view",
        host.one_visible_device,
    ),
    _lm_cpu(
        "lm-cpu.fused_kernels",
        "megatron.legacy.fused_kernels:load",
        "the fused-kernel loader needs CUDA_HOME (it builds nothing in 0.16 either)",
        _const(host.nothing),
        versions="0.16",
    ),
    _lm_cpu(
        "lm-cpu.device_arch",
        "megatron.training.arguments:get_device_arch_version",
        "validate_args asks for the GPU architecture under TP or CP > 1; a CPU has none (0)",
        _const(host.no_device_arch),
    ),
    # ---------------------------------------------------------------- moe-reg pretrain's optimizer step
    Patch(
        "training.grad-norm-check",
        "megatron.core.optimizer.optimizer:get_grad_norm_fp32",
        "0.16-0.19",
        "every Megatron optimizer computes the gradient norm (one reduction, read on the host) before it "
        "clips and updates; a non-finite norm stops the step there, before the update "
        "(--check-for-nan-in-loss-and-grad, while moe-reg pretrain's step runs)",
        "training",
    ),
    # ---------------------------------------------------------------- a plugin router's routing
    Patch(
        "routing.aux-loss-scores",
        "megatron.core.transformer.moe.router:compute_routing_scores_for_aux_loss",
        "0.16-0.19",
        "TopKRouter.routing normalizes sigmoid / sqrtsoftplus scores for the load-balancing losses as "
        "s / (sum + 1e-20), which a router can defeat by shrinking every score (Megatron-LM #1545); "
        "with --moe-router-exact-score-normalization the division is done in log space "
        "(aux_loss.exact_aux_loss_scores, while a plugin router's routing runs)",
        "routing",
    ),
    # ---------------------------------------------------------------- data
    Patch(
        "data.node-local-cache",
        "torch.distributed:is_initialized",
        "0.16-0.19",
        "megatron-core builds dataset index caches on global rank 0 only; with a --data-cache-path local "
        "to each node, the first rank of every other node builds its node's copy seeing no process group",
        "data",
    ),
    # ---------------------------------------------------------------- in-place edits of Megatron state
    Patch(
        "compat.z_loss_avg_group",
        "megatron.core.transformer.moe.moe_utils:get_moe_layer_wise_logging_tracker",
        "0.16",
        "0.16 records z_loss without a reduction group, so its logged value is one rank's; the "
        "z_loss entry gets 0.17+'s TP x DP x CP averaging group (logging only)",
        "compat",
        kind="mutate",
    ),
)

BY_KEY = {patch.key: patch for patch in PATCHES}
assert len(BY_KEY) == len(PATCHES), "patch keys must be unique"

_ORIGINALS: dict[str, tuple[bool, Any]] = {}  # key -> (attribute existed, original), for applied rows
_APPLIED_SCOPES: set[str] = set()  # scopes applied for the life of the process


def installed_version() -> Version:
    from megatron.core import package_info

    return Version(package_info.__version__)


def rows(scope: str, version: Version | None = None) -> list[Patch]:
    """The rows of ``scope`` that apply to ``version`` (default: the installed megatron-core)."""
    version = version or installed_version()
    return [p for p in PATCHES if p.scope == scope and p.applies_to(version)]


def apply(patch: Patch, value: Any = None) -> Any:
    """Apply one row (its ``make``, or ``value`` for rows without one); returns the original."""
    owner, name = patch.owner_and_name()
    existed = hasattr(owner, name)
    original = getattr(owner, name, None)
    if patch.kind == "define" and existed:
        return original  # defined by this megatron-core build (e.g. TE installed): nothing to add
    _ORIGINALS.setdefault(patch.key, (existed, original))
    setattr(owner, name, patch.make(original) if patch.make is not None else value)
    return original


def apply_scope(scope: str, sources: tuple[str, ...] = SOURCES) -> int:
    """Apply every row of ``scope`` (from ``sources``) that applies to the installed megatron-core;
    returns the count."""
    selected = [p for p in rows(scope) if p.source in sources]
    for patch in selected:
        apply(patch)
    return len(selected)


def fix_megatron_core() -> int:
    """Apply the rows of scope ``megatron-core`` (once); returns the count."""
    if "megatron-core" in _APPLIED_SCOPES:
        return 0
    _APPLIED_SCOPES.add("megatron-core")
    return apply_scope("megatron-core")


def prepare_checkpoint_writer() -> int:
    """Apply the rows of scope ``checkpoint`` (once, before the first save); returns the count."""
    if "checkpoint" in _APPLIED_SCOPES:
        return 0
    _APPLIED_SCOPES.add("checkpoint")
    return apply_scope("checkpoint")


@contextlib.contextmanager
def replaced(key: str, value: Callable[[Any], Any]) -> Iterator[Any]:
    """Row ``key``'s target set to ``value(original)`` while the block runs; yields the original."""
    patch = BY_KEY[key]
    owner, name = patch.owner_and_name()
    original = getattr(owner, name)
    setattr(owner, name, value(original))
    try:
        yield original
    finally:
        setattr(owner, name, original)


def resolve(key: str) -> Any:
    """The current value of row ``key``'s target (for ``mutate`` rows: the object to edit)."""
    owner, name = BY_KEY[key].owner_and_name()
    return getattr(owner, name)


def unresolved_targets(
    version: Version | None = None, sources: tuple[str, ...] = SOURCES, table: tuple[Patch, ...] = PATCHES
) -> list[str]:
    """Rows in range (from ``sources``) whose target cannot be found, as ``key: why`` lines.

    A ``replace`` or ``mutate`` row needs its attribute (before it was applied), a ``define`` row
    needs the module and the attribute to be missing (before it was applied)."""
    version = version or installed_version()
    problems = []
    for patch in table:
        if patch.source not in sources or not patch.applies_to(version):
            continue
        try:
            owner, name = patch.owner_and_name()
        except (ImportError, AttributeError) as e:
            problems.append(f"{patch.key}: {patch.target} not found ({e})")
            continue
        existed = _ORIGINALS[patch.key][0] if patch.key in _ORIGINALS else hasattr(owner, name)
        if patch.kind == "define" and existed:
            problems.append(f"{patch.key}: {patch.target} already exists in megatron-core {version}")
        elif patch.kind != "define" and not existed:
            problems.append(f"{patch.key}: {patch.target} has no attribute {name!r}")
    return problems
