"""Multi-node for real, on one machine: launch/torchrun_multinode.sh run as two node agents of one
process each on 127.0.0.1 (c10d rendezvous), each node with its own data cache, trains EP 2 and
reproduces the single-node two-process run; the shared run directory gets one metrics record per
step (written by the global rank 0, not by each node's local rank 0)."""

import os
import socket
import subprocess
import sys

import pytest

from helpers import ROOT, TINY_MODEL, child_env, data_flags, pretrain, read_metrics, without

pytestmark = pytest.mark.multiprocess

FLAGS = ["--config", "examples/tiny_cpu.toml", *without(TINY_MODEL, "--vocab-size"),
         "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
         "--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr-warmup-iters", "0",
         "--moe-specialization-loss-coeff", "1e-2", "--moe-coupling-loss-coeff", "1e-2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_reproduce_the_single_node_run(embedded_dataset, tmp_path):
    data = [*data_flags(embedded_dataset)]
    single = pretrain(tmp_path, "single", [*FLAGS, "--data-cache-path", str(tmp_path / "single-cache")], nproc=2,
                      data=data, model=[])
    run_dir = tmp_path / "multi"
    env = {**child_env(), "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "NPROC_PER_NODE": "1", "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "RDZV_ID": "loopback"}
    nodes = [subprocess.Popen(["bash", "launch/torchrun_multinode.sh", "examples/tiny_cpu.toml", *FLAGS[2:], *data,
                               "--data-cache-path", str(tmp_path / f"node{n}" / "cache")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-3000:] for _, err in outputs]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3]  # once per step: only the global rank 0 writes
    for a, b in zip(single, rows, strict=True):
        for key in ("lm loss", "grad norm", "specialization_loss", "coupling_loss", "load_balancing_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
    for n in range(2):  # every node built its own dataset index cache
        assert any((tmp_path / f"node{n}" / "cache").rglob("*.npy")), n
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert os.path.isdir(run_dir / "checkpoints" / "iter_0000003")
