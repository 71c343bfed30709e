"""benchmarks/gpu_check.sh --dry-run: every step's command parses, the files it needs exist (the
prepared wheels among them), the mid-size model's configuration is valid, and the time boxes add
up to at most five minutes."""

import os
import subprocess
import sys

from helpers import ROOT, child_env


def _dry_run(wheels):
    env = {**child_env(), "GPU_CHECK_WHEELS": str(wheels), "PYTHON": sys.executable}
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_dry_run_checks_every_step(tmp_path):
    (tmp_path / "wheels").mkdir()
    proc = _dry_run(tmp_path / "wheels")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("install", "pytest", "grouped_gemm", "training", "megatron_lm"):
        assert f"dry-run: {step} (" in proc.stdout
    assert "time boxes add up to 300 s" in proc.stdout


def test_dry_run_names_missing_wheels(tmp_path):
    proc = _dry_run(tmp_path / "not-prepared")
    assert proc.returncode != 0
    assert "step install needs" in proc.stdout and "--prepare" in proc.stdout
    assert not os.path.exists(tmp_path / "not-prepared")
