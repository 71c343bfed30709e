"""CPU runtime layer: lets the real megatron-core train on CPU with gloo.

megatron-core assumes CUDA in a few dozen places (buffers allocated on
``torch.cuda.current_device()``, side streams in the DDP and the alltoall token
dispatcher, ``device="cuda"`` tensors in the schedules, the optimizer and the
checkpoint verifier, the CUDA RNG tracker). Every patch that maps those onto the
CPU lives in ``PATCHES`` below, with the reason and the megatron-core versions it
applies to. ``activate()`` applies them once and only when CUDA is absent; on a GPU
machine it does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

_ACTIVE = False


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")``, ordinal) to CPU."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


def _redirect_device_kwarg(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


def _tensor_to(original: Callable) -> Callable:
    @functools.wraps(original)
    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device, int)) and not isinstance(args[0], bool):
            args = (_cpu_device(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return original(self, *args, **kwargs)

    return to


def _tensor_cuda(_original: Callable) -> Callable:
    def cuda(self, *args, **kwargs):
        return self

    return cuda


def _tensor_type(original: Callable) -> Callable:
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name

    return type_


def _cpu_rng_get(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


class HostEvent(torch.cpu.Event):
    """A CUDA event on the host: work is complete as soon as it is issued."""

    def elapsed_time(self, end_event: "HostEvent") -> float:
        return 0.0


class HostStream(torch.cpu.Stream):
    """A CUDA stream on the host: ``record_event`` returns a completed event."""

    def record_event(self, event: HostEvent | None = None) -> HostEvent:
        return event if event is not None else HostEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = HostStream()


def _host_copy(_original: Callable) -> Callable:
    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        """Megatron's device-to-host copy; on GPU it yields numpy split sizes, so do the same."""
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return tensor

    return maybe_move_tensor_to_cpu


class _NullRange:
    """Stand-in for ``torch.cuda.nvtx`` range calls."""

    @staticmethod
    def push(*args, **kwargs):
        return 0

    @staticmethod
    def pop(*args, **kwargs):
        return 0


@dataclass(frozen=True)
class RuntimePatch:
    """One attribute replaced while CUDA is absent."""

    target: str  # "module.path:attribute"
    versions: str  # megatron-core versions the patch is needed for
    reason: str
    make: Callable[[Any], Any]  # original attribute -> replacement

    def apply(self) -> None:
        module_name, attr = self.target.split(":")
        owner: Any = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name, None)
        setattr(owner, name, self.make(original))


def _const(value: Any) -> Callable[[Any], Any]:
    return lambda _original: value


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "randn", "rand", "randint", "as_tensor")

PATCHES: tuple[RuntimePatch, ...] = (
    RuntimePatch("torch.cuda:current_device", "0.16-0.19",
                 "buffers and router weights are placed on torch.cuda.current_device()",
                 _const(torch.cpu.current_device)),
    RuntimePatch("torch.cuda:current_stream", "0.16-0.19",
                 "DDP grad sync and the alltoall dispatcher wait on the current stream",
                 _const(lambda *args, **kwargs: _DEFAULT_STREAM)),
    RuntimePatch("torch.cuda:Stream", "0.16-0.19",
                 "MoEAlltoAllTokenDispatcher creates a device-to-host side stream",
                 _const(HostStream)),
    RuntimePatch("torch.cuda:Event", "0.16-0.19",
                 "the alltoall dispatcher and DDP record events on side streams",
                 _const(HostEvent)),
    RuntimePatch("torch.cuda:stream", "0.16-0.19",
                 "side-stream context managers in the alltoall dispatcher",
                 _const(torch.cpu.stream)),
    RuntimePatch("torch.cuda:synchronize", "0.16-0.19",
                 "dist_checkpointing and the schedules synchronize the device",
                 _const(torch.cpu.synchronize)),
    RuntimePatch("torch.cuda:get_rng_state", "0.16-0.19",
                 "the RNG tracker snapshots the device generator; on CPU that is the CPU generator",
                 _const(_cpu_rng_get)),
    RuntimePatch("torch.cuda:manual_seed", "0.16-0.19",
                 "model_parallel_cuda_manual_seed seeds the device generator",
                 _const(_cpu_manual_seed)),
    RuntimePatch("torch.cuda.nvtx:range_push", "0.16-0.19",
                 "nvtx ranges raise on CPU-only torch builds", _const(_NullRange.push)),
    RuntimePatch("torch.cuda.nvtx:range_pop", "0.16-0.19",
                 "nvtx ranges raise on CPU-only torch builds", _const(_NullRange.pop)),
    RuntimePatch("megatron.core.tensor_parallel.random:_get_cuda_rng_state", "0.16-0.19",
                 "RNG tracker fork and activation recompute read the device RNG state",
                 _const(_cpu_rng_get)),
    RuntimePatch("megatron.core.tensor_parallel.random:_set_cuda_rng_state", "0.16-0.19",
                 "RNG tracker fork and activation recompute restore the device RNG state",
                 _const(_cpu_rng_set)),
    RuntimePatch("megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu", "0.16-0.19",
                 "alltoall split sizes stay tensors on CPU; gloo's all_to_all_single wants int lists",
                 _host_copy),
    RuntimePatch("torch:Tensor.cuda", "0.16-0.19",
                 "optimizer, dist-optimizer and broadcast helpers call tensor.cuda()",
                 _tensor_cuda),
    RuntimePatch("torch:Tensor.type", "0.16-0.19",
                 "optimizers and grad clipping assert dtypes as 'torch.cuda.<T>Tensor' strings",
                 _tensor_type),
    RuntimePatch("torch:Tensor.to", "0.16-0.19",
                 "rotary embeddings and routers move tensors to the CUDA device",
                 _tensor_to),
) + tuple(
    RuntimePatch(f"torch:{name}", "0.16-0.19",
                 'schedules, optimizer, clip_grads and the MoE tracker allocate with device="cuda"',
                 _redirect_device_kwarg)
    for name in _FACTORIES
)


def _megatron_version_patches() -> tuple[RuntimePatch, ...]:
    """Patches that depend on the installed megatron-core, not on the device alone."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    patches = []
    if not hasattr(moe_utils, "te_general_gemm"):
        patches.append(RuntimePatch(
            "megatron.core.transformer.moe.moe_utils:te_general_gemm", "0.16",
            "router_gating_linear references te_general_gemm, undefined without TE (NameError)",
            _const(None)))
    return tuple(patches)


def is_active() -> bool:
    return _ACTIVE


def activate() -> bool:
    """Apply the CPU runtime patches once when CUDA is absent. Returns whether they are active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    for patch in PATCHES + _megatron_version_patches():
        patch.apply()
    _install_cpu_rng_tracker()
    _ACTIVE = True
    log.info("megatron-core CPU runtime active (%d patches)", len(PATCHES))
    return True


def _install_cpu_rng_tracker() -> None:
    """Use Megatron's own CudaRNGStatesTracker on the CPU generator (fork, recompute, seeds)."""
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    tracker_cls = random.CudaRNGStatesTracker

    class CPURNGStatesTracker(tracker_cls):
        """Megatron's RNG tracker with its named states held as CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name=random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
