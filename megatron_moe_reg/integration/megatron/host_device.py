"""Host stand-ins for the CUDA objects megatron-core uses: the replacement values of the CPU rows
of the patch table (``patches``). Nothing here is applied by importing it."""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch


def cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")``, ordinal) to CPU."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


def redirect_device_kwarg(factory: Callable) -> Callable:
    """``factory(..., device="cuda")`` allocates on the CPU instead."""

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


def tensor_to(original: Callable) -> Callable:
    """``Tensor.to("cuda")`` stays on the CPU (dtype conversions still happen)."""

    @functools.wraps(original)
    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device, int)) and not isinstance(args[0], bool):
            args = (cpu_device(args[0]), *args[1:])
        if "device" in kwargs:
            kwargs["device"] = cpu_device(kwargs["device"])
        return original(self, *args, **kwargs)

    return to


def tensor_cuda(_original: Callable) -> Callable:
    """``Tensor.cuda()`` returns the tensor itself."""

    def cuda(self, *args, **kwargs):
        return self

    return cuda


def tensor_type(original: Callable) -> Callable:
    """``Tensor.type()`` names CPU tensors as their CUDA type, which the optimizers assert."""

    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name

    return type_


def cpu_rng_get(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def cpu_rng_set(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def cpu_manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def host_synchronize(device: Any = None) -> None:
    """``torch.cuda.synchronize``: host work is complete when issued. A function of its own, not
    ``torch.cpu.synchronize`` itself, so that torch.compile's device handlers stay distinct."""


class HostEvent(torch.cpu.Event):
    """A CUDA event on the host: work is complete as soon as it is issued."""

    def elapsed_time(self, end_event: HostEvent) -> float:
        return 0.0


class HostStream(torch.cpu.Stream):
    """A CUDA stream on the host: ``record_event`` returns a completed event."""

    def record_event(self, event: HostEvent | None = None) -> HostEvent:  # type: ignore[override]  # host events
        return event if event is not None else HostEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


DEFAULT_STREAM = HostStream()


def current_stream(*args, **kwargs) -> HostStream:
    return DEFAULT_STREAM


def host_copy(_original: Callable) -> Callable:
    """Megatron's device-to-host copy of the alltoall split sizes; on GPU it yields numpy, so here too."""

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return tensor

    return maybe_move_tensor_to_cpu


def nvtx_noop(*args, **kwargs) -> int:
    """``torch.cuda.nvtx.range_push`` / ``range_pop``, which raise on CPU-only torch builds."""
    return 0


def cpu_rng_tracker(_original: Any) -> Any:
    """Megatron's own ``CudaRNGStatesTracker`` with its named states held as CPU generator states
    (fork, activation recompute and seeding work unchanged)."""
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    tracker_cls = random.CudaRNGStatesTracker

    class CPURNGStatesTracker(tracker_cls):  # type: ignore[misc,valid-type]  # a class known at run time
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

    return CPURNGStatesTracker()
