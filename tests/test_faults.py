"""Faults never cost a checkpoint: a worker killed mid-step or during a save, a disk that fills during a
save. The previous checkpoint stays loadable, ``latest`` never names a partial one, and resuming gives
the uninterrupted run's losses exactly (real processes, gloo, 2 ranks with EP 2)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import MOCK, TINY_MODEL, child_env, read_metrics, run_cli

pytestmark = pytest.mark.multiprocess

FLAGS = [*TINY_MODEL, *MOCK, "--train-iters", "12", "--save-interval", "3", "--expert-model-parallel-size", "2"]


def _losses(log: Path) -> dict[int, float]:
    return {r["iteration"]: r["lm loss"] for r in read_metrics(log)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("straight")
    run_cli(["pretrain", *FLAGS, "--log-file", str(out / "r.jsonl"), "--save", str(out / "ck")], nproc=2)
    return _losses(out / "r.jsonl")


def _workers(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def _kill_a_worker_when(ck: Path, log: Path, ready) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "megatron_moe_reg.pretrain", *FLAGS, "--save", str(ck), "--log-file", str(log)]
    with open(log.with_suffix(".out"), "w") as output:  # files, not pipes: a killed worker's checkpoint
        # writer processes (megatron-core's async writer) outlive it and would hold a pipe open
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and not ready() and proc.poll() is None:
                time.sleep(0.005)
            assert proc.poll() is None, "the run ended before the fault"
            os.kill(_workers(proc.pid)[-1], signal.SIGKILL)
            assert proc.wait(timeout=300) != 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of the job, as a scheduler would


def _check_and_resume(tmp_path: Path, ck: Path, straight: dict[int, float]) -> int:
    from megatron_moe_reg.training.input_checks import complete_iterations

    latest = int((ck / "latest_checkpointed_iteration.txt").read_text())
    assert latest in complete_iterations(ck)
    for partial in ck.glob("iter_*.partial"):
        assert int(partial.name[5:12]) > latest  # a partial save is never the latest
    run_cli(["pretrain", *FLAGS, "--load", str(ck), "--save", str(ck), "--log-file", str(tmp_path / "resumed.jsonl")],
            nproc=2)
    resumed = _losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(latest + 1, 13))
    assert all(resumed[i] == straight[i] for i in resumed), (latest, resumed, straight)
    return latest


def test_a_worker_killed_mid_step(tmp_path, straight):
    ck, log = tmp_path / "ck", tmp_path / "first.jsonl"
    _kill_a_worker_when(ck, log, lambda: log.exists() and log.read_text().count('"lm loss"') >= 5)
    assert _check_and_resume(tmp_path, ck, straight) >= 3


def test_a_worker_killed_during_a_save(tmp_path, straight):
    ck, log = tmp_path / "ck", tmp_path / "first.jsonl"
    _kill_a_worker_when(ck, log, lambda: (ck / "iter_0000006.partial").exists())
    assert _check_and_resume(tmp_path, ck, straight) in (3, 6)  # 6 only if its save had finished


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(tmp_path, straight):
    ck, log = tmp_path / "ck", tmp_path / "first.jsonl"
    env = {"MOE_REG_TEST_FAIL_WRITES": "iter_0000006"}  # tests/stand_ins/sitecustomize.py
    proc = run_cli(["pretrain", *FLAGS, "--save", str(ck), "--log-file", str(log)], nproc=2, check=False, env=env)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moe-reg: ")]
    assert lines == [f"moe-reg: stopped: iteration 6: writing the checkpoint to {ck / 'iter_0000006.partial'} "
                     f"failed (No space left on device); the last checkpoint, {ck / 'iter_0000003'}, is intact: "
                     f"free space or choose another --save, and resume with --load {ck}"], proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if "megatron" in line and line.strip().startswith('File "')]
    assert not (ck / "iter_0000006.partial").exists()
    assert _check_and_resume(tmp_path, ck, straight) == 3


_WRITER_QUEUE = """
import sys, time
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
if sys.argv[1] == "plugin":
    from megatron_moe_reg.integration.megatron import patches
    patches.prepare_checkpoint_writer()
    queue = fa._results_queue
else:  # megatron-core's own
    queue = (getattr(fa, "get_write_results_queue", None) or fa._get_write_results_queue)()
print(queue._manager._process.pid, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize("writer", ["plugin", "megatron-core"])
def test_the_checkpoint_writers_helper_server_ends_with_a_killed_rank(writer):
    """megatron-core's torch_dist writer keeps a Manager server per rank; a rank killed by SIGKILL
    left it running (the control), the plugin's ends with the rank."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER_QUEUE, writer], stdout=subprocess.PIPE, text=True,
                            env=child_env(), start_new_session=True)
    server = int(proc.stdout.readline())
    try:
        assert _running(server)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and _running(server):
            time.sleep(0.05)
        assert _running(server) == (writer == "megatron-core")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)
