"""Every Triton kernel of the project compiles for a Hopper GPU (sm_90) here, without a GPU
(``tests/kernel_compile_probe.py``, one process): what Triton's interpreter cannot check, code the
compiler rejects and tiles that need more shared memory than an H100/H200 block has."""

import importlib.util
import json
import subprocess
import sys

import pytest

from helpers import ROOT, child_env
from kernel_compile_probe import CASES

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def _compiler_available() -> bool:
    """Triton with ``ASTSource``, ``GPUTarget`` and its NVIDIA backend (ptxas) is installed."""
    if importlib.util.find_spec("triton") is None:
        return False
    import triton.backends.compiler
    import triton.compiler

    return (hasattr(triton.compiler, "ASTSource") and hasattr(triton.backends.compiler, "GPUTarget")
            and "nvidia" in getattr(triton.backends, "backends", {}))


pytestmark = pytest.mark.skipif(not _compiler_available(), reason="needs Triton with its NVIDIA backend")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("kernels") / "compiled.json"
    env = {k: v for k, v in child_env().items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")  # compiled afresh, not read from a cache
    proc = subprocess.run([sys.executable, "tests/kernel_compile_probe.py", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_compiles_for_hopper(compiled, case):
    result = compiled[case]
    assert result["error"] is None, result["error"]
    assert result["cubin"], "no cubin: ptxas did not run"
    assert result["shared"] <= SHARED_LIMIT, result["shared"]
