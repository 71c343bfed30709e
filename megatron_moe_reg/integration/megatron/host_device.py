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


def no_graph_capture() -> bool:
    """``torch.cuda.is_current_stream_capturing``: no CUDA graph is ever captured on the CPU."""
    return False


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


# ---------------------------------------------------------------- Megatron-LM's initialize path without CUDA


def allow_no_cuda(original: Callable) -> Callable:
    """``initialize_megatron`` called with ``allow_no_cuda=True``."""

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    return initialize_megatron


def one_visible_device(original: Callable) -> Callable:
    """While ``original`` runs, ``torch.cuda.device_count()`` is 1 and ``torch.cuda.set_device`` does
    nothing (Megatron-LM creates its parallel groups and seeds only when it counts a device)."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        count, set_device = torch.cuda.device_count, torch.cuda.set_device
        torch.cuda.device_count = lambda: 1  # the one device of a CPU run
        torch.cuda.set_device = lambda device: None
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.device_count, torch.cuda.set_device = count, set_device

    return wrapper


def skip_when_helpers_import(original: Callable) -> Callable:
    """``compile_helpers``: nothing to build when the compiled dataset helper already imports."""

    @functools.wraps(original)
    def compile_helpers(*args, **kwargs):
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            return original(*args, **kwargs)
        return None

    return compile_helpers


def nothing(*args, **kwargs) -> None:
    """A loader with nothing to load."""


def no_device_arch(*args, **kwargs) -> int:
    """``get_device_arch_version`` of a machine without a GPU."""
    return 0


def optimizer_states_before_load(original: Callable) -> Callable:
    """``DistributedOptimizer.sharded_state_dict``: without Apex or TransformerEngine megatron-core
    reads the Adam step from the per-parameter states, which torch's Adam creates only at its first
    step, so asking for the state to load a checkpoint into fails (``assert len(steps) == 1``).
    Before a load, empty states (step 0, zero moments) are created; the load replaces the moments.
    The step itself is not in such a checkpoint (megatron-core keeps it only in the optimizer's
    parameter groups, which its ``dp_reshardable`` format does not store): the optimizer is marked
    ``moe_reg_step_missing`` for the add-on to restore it (``set_adam_step``)."""

    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        module = importlib.import_module(type(self).__module__)
        if is_loading and not getattr(module, "HAVE_APEX_OR_TE", True) and not self.optimizer.state:
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    state = {"step": torch.zeros((), dtype=torch.float32)}
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    self.optimizer.state[param] = state
            self.moe_reg_step_missing = True
        if model_sharded_state_dict is None:
            model_sharded_state_dict = {}
        return original(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    return sharded_state_dict


def optimizer_state_load(original: Callable) -> Callable:
    """``DistributedOptimizer.load_state_dict`` under ``torch.no_grad()`` (with fp32 parameters the
    main parameters are views of the model's leaves), and, afterwards, one Adam step tensor per
    parameter: without Apex or TransformerEngine megatron-core gives every parameter the same
    tensor, which torch's Adam then increments once per parameter and step."""

    @functools.wraps(original)
    def load_state_dict(self, *args, **kwargs):
        with torch.no_grad():
            out = original(self, *args, **kwargs)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if torch.is_tensor(step):
                state["step"] = step.clone()
        return out

    return load_state_dict


def set_adam_step(optimizer: Any, step: int) -> bool:
    """Give every Adam state of the (chained) optimizers marked ``moe_reg_step_missing`` the step
    ``step``; returns whether any was marked."""
    found = False
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(inner, "moe_reg_step_missing", False):
            for state in inner.optimizer.state.values():
                state["step"] = torch.tensor(float(step))
            inner.moe_reg_step_missing = False
            found = True
    return found
