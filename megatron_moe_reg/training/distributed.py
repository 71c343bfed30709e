"""Process groups, Megatron parallel state and seeds (nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist

from megatron_moe_reg.integration.megatron import cpu_runtime, patches


def on_gpu() -> bool:
    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str = "auto", timeout_minutes: int = 10) -> None:
    """Join the torchrun/Slurm process group, or create a world of one when launched alone."""
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if on_gpu() else "gloo"
    if on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ:  # torchrun / Slurm (env://)
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # launched alone: a private world of one, without touching the environment
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )


def initialize(cfg) -> None:
    """Process group, megatron-core's fixes, CPU runtime (when no CUDA), model-parallel groups, seeds."""
    from megatron.core import parallel_state

    init_process_group(cfg.parallel.distributed_backend)
    patches.fix_megatron_core()  # on any machine
    cpu_runtime.activate()
    p = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
    )
    set_seed(cfg.train.seed)


def set_seed(seed: int) -> None:
    """Megatron-LM's seeding: offset by pipeline rank, then the model-parallel RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
