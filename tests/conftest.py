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

