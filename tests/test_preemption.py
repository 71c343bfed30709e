"""Preemption as Megatron-LM users expect: SIGTERM to torchrun with --exit-signal-handler finishes the
step, saves and exits; resuming continues with the uninterrupted run's losses."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import MOCK, TINY_MODEL, child_env, read_metrics, run_cli

pytestmark = pytest.mark.multiprocess

FLAGS = [*TINY_MODEL, *MOCK, "--train-iters", "16", "--expert-model-parallel-size", "2", "--exit-signal-handler"]


def test_sigterm_saves_the_current_step_and_the_resumed_run_continues_exactly(tmp_path):
    ck, log = tmp_path / "ck", tmp_path / "first.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "megatron_moe_reg.pretrain", *FLAGS, "--save", str(ck), "--log-file", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or log.read_text().count('"lm loss"') < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # as Slurm does: the launcher is signalled and forwards it
    out, err = proc.communicate(timeout=300)
    assert "SIGTERM received (--exit-signal-handler): saving and stopping after iteration" in out, err[-3000:]
    stopped = read_metrics(log)[-1]["iteration"]
    assert 3 <= stopped < 16 and (ck / "latest_checkpointed_iteration.txt").read_text() == str(stopped)
    # torchrun's agent reports the signal it got; no worker prints a traceback
    assert not [line for line in err.splitlines() if "megatron" in line and line.strip().startswith('File "')]
    resumed = {r["iteration"]: r for r in read_metrics_of(tmp_path, "resumed", ["--load", str(ck)])}
    straight = {r["iteration"]: r for r in read_metrics_of(tmp_path, "straight", [])}
    assert sorted(resumed) == list(range(stopped + 1, 17))
    assert all(resumed[i]["lm loss"] == straight[i]["lm loss"] for i in resumed), (stopped, resumed, straight)


def read_metrics_of(out, name: str, extra: list[str]) -> list[dict]:
    log = out / f"{name}.jsonl"
    run_cli(["pretrain", *FLAGS, "--log-file", str(log), *extra], nproc=2)
    return read_metrics(log)


def test_the_duration_limit_stops_every_rank_alike(groups):
    from megatron_moe_reg.training.preemption import EarlyExit

    off = EarlyExit(False, None, "cpu")
    assert off.reason() is None
    limited = EarlyExit(False, 2, "cpu")
    assert limited.reason() is None
    limited.started -= 121
    assert limited.reason() == "--exit-duration-in-mins 2 reached"
