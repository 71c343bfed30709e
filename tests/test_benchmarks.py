"""Every benchmark runs as the README writes it (``python benchmarks/NAME.py`` from the checkout,
so ``benchmarks/`` comes first on ``sys.path``), at its smallest setting, and prints its table."""

import subprocess
import sys

import pytest

from helpers import ROOT, child_env

SMALL = ["--vocab-size", "256", "--micro-batch-size", "1"]
RUNS = {
    "grouped_gemm_speed": ["--rounds", "1", "--shapes", "coarse"],
    "gram_kernel_speed": ["--rounds", "1"],
    "integration_overhead": ["--steps", "1", *SMALL],
    "router_overhead": ["--tokens", "64", "--hidden", "64", "--experts", "4", "--rank", "4", "--router-iters", "1",
                        "--steps", "1"],
    "loss_overhead": ["--rounds", "1", "--num-layers", "2", "--profile-steps", "1", "--no-memory", *SMALL],
    "loss_overhead-ep2": ["--ep", "2", "--dispatcher", "allgather", "--rounds", "1", "--num-layers", "2",
                          "--profile-steps", "0", *SMALL],
}
EXPECT = {"grouped_gemm_speed": "| shape |", "gram_kernel_speed": "| tiny |", "integration_overhead": "device:",
          "router_overhead": "router forward+backward", "loss_overhead": "R_sp+R_cp breakdown",
          "loss_overhead-ep2": "floor:"}


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(RUNS))
def test_benchmark_runs_as_written(name):
    script = f"benchmarks/{name.split('-')[0]}.py"
    proc = subprocess.run([sys.executable, script, *RUNS[name]], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert EXPECT[name] in proc.stdout, proc.stdout[-2000:]
