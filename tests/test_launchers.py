"""The launch scripts build the torchrun commands the README documents (DRY_RUN=1 prints them)."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _dry(script: str, args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DRY_RUN": "1", "PYTHON": "python3", **env})


def test_single_node_command_uses_the_prepared_dataset_and_run_directory():
    proc = _dry("torchrun.sh", ["examples/tiny_cpu.toml", "--train-iters", "2"], NPROC="2", RUN_DIR="runs/x")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[:6] == ["python3", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert "--train-data-path" in cmd and cmd[-2:] == ["--train-iters", "2"]
    assert cmd[cmd.index("--save") + 1] == "runs/x/checkpoints" == cmd[cmd.index("--load") + 1]


def test_multi_node_command_and_its_required_environment():
    env = {"NNODES": "2", "MASTER_ADDR": "node0", "NPROC_PER_NODE": "8", "RDZV_ID": "job7"}
    proc = _dry("torchrun_multinode.sh", ["examples/mixtral_like.toml", "--mock-data"], **env)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    for flag, value in (("--nnodes", "2"), ("--rdzv-backend", "c10d"), ("--rdzv-endpoint", "node0:29500"),
                        ("--rdzv-id", "job7"), ("--nproc-per-node", "8"),
                        ("--config", "examples/mixtral_like.toml")):
        assert cmd[cmd.index(flag) + 1] == value
    missing = _dry("torchrun_multinode.sh", ["examples/mixtral_like.toml"], MASTER_ADDR="n")
    assert missing.returncode != 0 and "NNODES" in missing.stderr


def test_a_bad_flag_stops_in_one_process_before_torchrun(tmp_path):
    """The launcher checks the configuration and inputs first: one line, exit status 2, no torchrun report."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    proc = subprocess.run(["bash", "launch/torchrun.sh", "examples/tiny_cpu.toml", "--mock-data",
                           "--moe-coupling-loss-coeff", "nan"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHON": sys.executable, "NPROC": "2", "RUN_DIR": str(tmp_path / "run")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moe-reg: error: --moe-coupling-loss-coeff"), lines
    assert "torch.distributed" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_slurm_command_asks_for_the_signal_early_and_saves_on_it():
    env = {"SLURM_NNODES": "2", "SLURM_JOB_ID": "77", "HEAD_NODE": "node0", "SLURM_GPUS_ON_NODE": "8"}
    proc = _dry("slurm.sbatch", ["examples/mixtral_like.toml", "--mock-data"], **env)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    for flag, value in (("--nnodes", "2"), ("--nproc-per-node", "8"), ("--rdzv-backend", "c10d"),
                        ("--rdzv-endpoint", "node0:29500"), ("--rdzv-id", "77")):
        assert cmd[cmd.index(flag) + 1] == value, (flag, cmd)
    assert "--exit-signal-handler" in cmd and cmd[-1] == "--mock-data"
    directives = [line for line in (ROOT / "launch" / "slurm.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=TERM@300" in directives and "#SBATCH --requeue" in directives
