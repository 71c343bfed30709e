"""Run the real ``moe-reg`` entry points (alone or under torchrun) and read their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# A small GPT-MoE that trains in seconds on a CPU core.
TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
    "--moe-ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2", "--seq-length", "32",
    "--vocab-size", "256", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1",
    "--log-interval", "1", "--no-progress-bar", "--eval-iters", "0",
]
MOCK = ["--mock-data"]


def _env() -> dict:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600, check: bool = True,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``moe-reg ARGS`` alone, or ``torchrun --nproc-per-node N -m megatron_moe_reg.pretrain ARGS``."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_moe_reg.cli", *args]
    else:
        assert args[0] == "pretrain"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_moe_reg.pretrain", *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(path: str | Path) -> list[dict]:
    """Per-step training records of a ``--log-file`` (validation records left out)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "lm loss" in r]


def read_validation(path: str | Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "validation loss" in r]


def pretrain(out: Path, name: str, extra: list[str], nproc: int = 1, data: list[str] = MOCK,
             model: list[str] = TINY_MODEL) -> list[dict]:
    """Run pretraining with ``--log-file out/name.jsonl`` and return its per-step records."""
    log = out / f"{name}.jsonl"
    if log.exists():
        log.unlink()
    run_cli(["pretrain", *model, *data, "--log-file", str(log), *extra], nproc=nproc)
    return read_metrics(log)


def data_flags(manifest: dict) -> list[str]:
    """Flags that train on a dataset written by ``moe-reg prepare-data``."""
    return ["--tokenizer-model", manifest["tokenizer_model"], "--train-data-path",
            manifest["train_data_path"], "--valid-data-path", manifest["valid_data_path"]]


def without(flags: list[str], *names: str) -> list[str]:
    """``flags`` with the named options (and their values) removed."""
    out, skip = [], False
    for item in flags:
        if skip:
            skip = False
            continue
        if item in names:
            skip = not item.startswith("--no-")
            continue
        out.append(item)
    return out
