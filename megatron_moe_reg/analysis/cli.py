"""``moe-reg analyze --load CKPT [--load CKPT2 ...] [--data-path PREFIX ...] --num-tokens N --out DIR``.

Each checkpoint is evaluated in its own process (``analysis.evaluate``: one process, any saved
layout) on the same tokens; the report compares them side by side.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from megatron_moe_reg.errors import ConfigError
from megatron_moe_reg.flags import OneLineErrorParser
from megatron_moe_reg.training.input_checks import check_output_outside


def _names(loads: list[str], labels: list[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(loads):
            raise ConfigError(f"--label: give one per --load ({len(loads)}), got {len(labels)}")
        names = labels
    else:
        names = [Path(p.rstrip("/")).name or f"checkpoint{i}" for i, p in enumerate(loads)]
    names = [re.sub(r"[^A-Za-z0-9_.-]+", "_", n) for n in names]
    if len(set(names)) != len(names):
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    return names


def main(argv: list[str]) -> int:
    p = OneLineErrorParser(prog="moe-reg analyze", description="Routing analysis report of checkpoints.")
    p.add_argument("--load", action="append", required=True, help="checkpoint directory (repeat to compare)")
    p.add_argument("--label", action="append", help="name of each checkpoint in the report")
    p.add_argument(
        "--data-path",
        nargs="+",
        help="validation dataset prefixes (default: the first checkpoint's "
        "--valid-data-path, else its --data-path; random tokens for --mock-data checkpoints)",
    )
    p.add_argument("--num-tokens", type=int, default=8192, help="validation tokens to evaluate")
    p.add_argument("--sample-tokens", type=int, default=256, help="tokens on which every expert is run (PES, MSO)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--out", required=True, help="report directory")
    a = p.parse_args(argv)
    if a.num_tokens < 1 or a.sample_tokens < 1:
        raise ConfigError("--num-tokens and --sample-tokens must be >= 1")
    for load in a.load:
        if not Path(load).is_dir():
            raise ConfigError(f"--load {load}: no such directory")
    check_output_outside(a.out, "--out", a.load)
    out = Path(a.out)
    results = {}
    data = a.data_path
    for name, load in zip(_names(a.load, a.label), a.load, strict=False):
        target = out / f"{name}.eval.json"
        cmd = [
            sys.executable,
            "-m",
            "megatron_moe_reg.analysis.evaluate",
            "--load",
            load,
            "--out",
            str(target),
            "--num-tokens",
            str(a.num_tokens),
            "--sample-tokens",
            str(a.sample_tokens),
            "--micro-batch-size",
            str(a.micro_batch_size),
        ]
        if data:
            cmd += ["--data-path", *data]
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
        print(f"evaluating {load} ...", flush=True)
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            return proc.returncode
        results[name] = json.loads(target.read_text())
        target.unlink()
        if data is None:  # every checkpoint on the same tokens: the first one's validation data
            data = _first_data(results[name])
    from megatron_moe_reg.analysis.report import write_report

    print(f"report: {write_report(results, out)}")
    return 0


def _first_data(result: dict) -> list[str] | None:
    return result.get("data_path") or None
