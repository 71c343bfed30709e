import os
import typing

import pytest
import torch

from helpers import run_cli

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

if not hasattr(typing, "override"):  # Megatron-LM's megatron.training (0.19 wheels) uses Python 3.12's
    typing.override = lambda method: method  # type: ignore[attr-defined]  # test harness only, for 3.11


@pytest.fixture(scope="session")
def embedded_dataset(tmp_path_factory) -> dict:
    """A small dataset built by ``moe-reg prepare-data`` from the embedded corpus."""
    import json

    out = tmp_path_factory.mktemp("embedded") / "data"
    run_cli(["prepare-data", "--output-dir", str(out), "--max-documents", "120", "--vocab-size", "1024"])
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def groups():
    """Megatron's process groups of one process (gloo, CPU runtime layer), torn down afterwards."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe_reg.integration.megatron import cpu_runtime
    from megatron_moe_reg.training.distributed import init_process_group

    init_process_group("gloo")
    cpu_runtime.activate()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    yield get_default_pg_collection()
    parallel_state.destroy_model_parallel()
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_reg.integration.megatron.compat import reset_megatron_moe_tracker

    # backwards outside a schedule leave a 0-d aux-loss scale and a 2-layer tracker behind
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    reset_megatron_moe_tracker()
