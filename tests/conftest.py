import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import run_cli  # noqa: E402


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

    from megatron_moe_reg.integration import cpu_runtime
    from megatron_moe_reg.training.distributed import init_process_group

    init_process_group("gloo")
    cpu_runtime.activate()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    yield get_default_pg_collection()
    parallel_state.destroy_model_parallel()
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_reg.integration.compat import reset_megatron_moe_tracker

    # backwards outside a schedule leave a 0-d aux-loss scale and a 2-layer tracker behind
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    reset_megatron_moe_tracker()
