"""A training step that is not a log step makes no host-device synchronizing call from the
plugin's own code (tests/sync_watch.py), with R_sp and R_cp on: one process, and EP 2 with both
dispatchers (the token subsample's metadata path under alltoall), the Triton experts and R_sp's
Triton Gram kernels in Triton's interpreter (their host-side wrappers, which a GPU runs compiled; the
interpreter's own reads are Triton's, not counted), and each plugin router with the router penalties
and the weight-orthogonality loss.
Allowed count: 0."""

import json
from pathlib import Path

import pytest

from helpers import PENALTIES, ROOT, ROUTER_FLAGS, run_script

WATCH = Path(__file__).parent / "sync_watch.py"
BASE = ["--config", str(ROOT / "examples" / "tiny_cpu.toml"), "--mock-data", "--vocab-size", "512",
        "--num-layers", "2", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "10", "--lr-warmup-iters", "1", "--log-interval", "5", "--eval-iters", "0",
        "--moe-specialization-loss-coeff", "2e-3", "--moe-coupling-loss-coeff", "1e-3"]
LAYOUTS = {
    "one-process": (1, ["--moe-grouped-gemm-backend", "sequential"]),
    "ep2-alltoall-sampled-torch-experts": (2, ["--expert-model-parallel-size", "2", "--moe-grouped-gemm-backend",
                                               "torch", "--moe-specialization-max-tokens", "50"]),
    "ep2-allgather": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather",
                          "--moe-grouped-gemm-backend", "sequential"]),
    "one-process-triton-experts-interpreted": (1, ["--moe-grouped-gemm-backend", "triton",
                                                   "--moe-specialization-gram-kernel", "triton"]),
    # every plugin router with both router penalties and the weight-orthogonality loss
    **{f"one-process-{kind}-router-penalties-orthogonality": (1, [
        *flags, *PENALTIES, "--moe-weight-orthogonality-coeff", "1e-2", "--moe-grouped-gemm-backend", "sequential",
        *(["--moe-z-loss-coeff", "0"] if kind == "prototype" else [])]) for kind, flags in ROUTER_FLAGS.items()},
}
INTERPRETED = {"TRITON_INTERPRET": "1"}


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_log_step_has_no_plugin_host_sync(layout, tmp_path):
    nproc, flags = LAYOUTS[layout]
    if "triton" in flags:
        pytest.importorskip("triton")
    run_script(WATCH, [str(tmp_path), *BASE, *flags], nproc=nproc, env=INTERPRETED if "triton" in flags else None)
    result = json.loads((tmp_path / "sync_calls.json").read_text())
    assert result["control"], "the watch must see the host reads of a log step's report"
    assert result["calls"] == [], result["calls"]
    assert result["cuda_calls"] == [], result["cuda_calls"]  # CUDA's detector (on a GPU only)
