"""What the tests share: running the real ``moe-reg`` entry points (alone or under torchrun) and
reading their metrics, one step of the plugin losses under any layout (``probe``) and comparing it
with a reference (``assert_same``), and the flag sets several test modules use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The style of the small models here: SwiGLU, RMSNorm, RoPE, no biases or dropout, AdamW as in
# modern LLM recipes (Megatron-LM's own defaults differ; examples/*.toml set these too).
SMALL_MODEL_STYLE = [
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--moe-aux-loss-coeff", "1e-2", "--moe-router-dtype",
    "fp32", "--moe-per-layer-logging", "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--adam-beta2",
    "0.95", "--num-workers", "0",
]
# Options for tests that parse a run's flags: mock data, 8 experts and that style.
PARSE_BASE = ["--mock-data", "--vocab-size", "512", "--num-experts", "8", *SMALL_MODEL_STYLE]
# A small GPT-MoE that trains in seconds on a CPU core.
TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
    "--moe-ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2", "--seq-length", "32",
    "--vocab-size", "256", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1",
    "--log-interval", "1", "--no-progress-bar", "--eval-iters", "0", *SMALL_MODEL_STYLE,
]
MOCK = ["--mock-data"]


STAND_INS = str(Path(__file__).parent / "stand_ins")  # typing.override for megatron.training on 3.11


def child_env() -> dict:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([STAND_INS, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600, check: bool = True,
            cwd: str | Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``moe-reg ARGS`` alone, or ``torchrun --nproc-per-node N -m megatron_moe_reg.pretrain ARGS``."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_moe_reg.cli", *args]
    else:
        assert args[0] == "pretrain"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_moe_reg.pretrain", *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**child_env(), **(env or {})},
                          cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def run_script(script: str | Path, args: list[str], nproc: int = 1, timeout: int = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N SCRIPT ARGS`` with the tests' environment (and ``env``); fails with
    its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**child_env(), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-6000:]
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


# ---------------------------------------------------------------- one step of the plugin losses (grad_probe.py)
PROBE = str(Path(__file__).parent / "grad_probe.py")
LOSS_MODEL = without(TINY_MODEL, "--num-layers") + ["--num-layers", "4", "--moe-aux-loss-coeff", "0"]
LOSSES = ["--moe-specialization-loss-coeff", "1.0", "--moe-coupling-loss-coeff", "1.0",
          "--moe-metrics-interval", "1", "--moe-metrics-sample-tokens", "16"]  # PES / MSO: 16 = seq / TP
BATCH = ["--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "1", "--lr-warmup-iters", "0"]
LOSS_LAYOUTS = {
    "dp2": (2, []),
    "ep2-allgather": (2, ["--expert-model-parallel-size", "2"]),
    "ep2-alltoall": (2, ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]),
    "tp2-sp-etp2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "tp2-sp-etp2-alltoall": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                 "--moe-token-dispatcher-type", "alltoall"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "one-micro-batch": (1, ["--micro-batch-size", "8"]),
    "recompute-full": (1, ["--recompute-granularity", "full", "--recompute-method", "uniform",
                           "--recompute-num-layers", "1"]),
    "recompute-selective-moe": (1, ["--recompute-granularity", "selective", "--recompute-modules", "moe"]),
    "per-token-loss": (1, ["--calculate-per-token-loss"]),
    "pp2-recompute-full": (2, ["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full",
                               "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
    "tp2-sp-per-token-loss": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                  "--calculate-per-token-loss"]),
    "tp2-sp-ep2-etp1": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                            "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                            "--moe-token-dispatcher-type", "alltoall"]),
}


def probe(out: Path, flags: list[str], nproc: int, model: list[str] = LOSS_MODEL) -> tuple[dict, dict]:
    """Run tests/grad_probe.py (one step of the plugin losses, gradients saved); ``model`` may start
    with ``--lm-loss-scale S``. Returns (reported values, reduced gradients)."""
    from megatron_moe_reg.training.checkpointing import read_model_tensors

    head = model[:2] if model[:1] == ["--lm-loss-scale"] else []
    cmd = [sys.executable, PROBE, str(out), *head, *model[len(head):], "--mock-data", *BATCH, *LOSSES, *flags]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "values.json").read_text()), read_model_tensors(str(out / "grads"))


def assert_same(values, grads, ref_values, ref_grads, layout):
    """Values within 1e-5 (relative) and gradients within 1e-5 of their scale of a reference run."""
    assert values.keys() == ref_values.keys()
    for key, expected in ref_values.items():
        assert values[key] == pytest.approx(expected, rel=1e-5, abs=1e-7), (layout, key)
    assert grads.keys() == ref_grads.keys()
    for key, expected in ref_grads.items():
        scale = expected.abs().max().item()
        diff = (grads[key] - expected).abs().max().item()
        assert diff <= 1e-5 * max(scale, 1e-3), (layout, key, diff, scale)


# ---------------------------------------------------------------- routers
ROUTER_FLAGS = {
    "spectral": ["--moe-router-type", "spectral"],
    "prototype": ["--moe-router-type", "prototype"],
    "ermoe": ["--moe-router-type", "ermoe", "--moe-eigen-rank", "4", "--moe-eigen-threshold", "0.5"],
    "emoe": ["--moe-router-type", "emoe", "--moe-eigen-rank", "4", "--moe-emoe-ortho-coeff", "1e-2"],
}
PENALTIES = ["--moe-router-spectral-penalty-coeff", "0.1", "--moe-router-stable-rank-coeff", "0.1"]


# ---------------------------------------------------------------- Megatron-LM's own loop
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"  # files the tests read
CHECKOUT = os.environ.get("MEGATRON_LM_PATH")  # a Megatron-LM checkout: run its pretrain_gpt.py instead
MEGATRON_LM_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "2e-3",
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "64", "--mock-data",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--log-interval", "1", "--eval-iters", "0",
    "--eval-interval", "1000", "--hidden-dropout", "0", "--attention-dropout", "0",
]


def megatron_lm_available() -> bool:
    """Megatron-LM's loop can run: a checkout is named, or megatron-core ships megatron.training (0.19+)."""
    if CHECKOUT:
        return True
    import importlib.util

    from megatron.core import package_info
    from packaging.version import Version

    return Version(package_info.__version__) >= Version("0.19") and importlib.util.find_spec(
        "megatron.training") is not None


def run_megatron_lm(flags: list[str], nproc: int = 1, timeout: int = 600, check: bool = True,
                    env: dict | None = None) -> subprocess.CompletedProcess:
    """Megatron-LM's pretrain() with the plugin under torchrun: ``moe-reg megatron-lm FLAGS``, or with
    MEGATRON_LM_PATH the checkout's pretrain_gpt.py through patches/pretrain_gpt_moe_reg.py."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if CHECKOUT:
        cmd, cwd = [*launch, str(ROOT / "patches" / "pretrain_gpt_moe_reg.py"), *flags], CHECKOUT
    else:
        cmd, cwd = [*launch, "-m", "megatron_moe_reg.cli", "megatron-lm", *flags], None
    full_env = {**child_env(), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def plugin_lines(stdout: str) -> dict[int, dict[str, float]]:
    """The plugin's ``moe-reg | iteration N | name value | ...`` lines: {N: {name: value}}."""
    out = {}
    for line in stdout.splitlines():
        if "moe-reg | iteration " not in line:
            continue
        fields = line.split("moe-reg | iteration ")[1].split(" | ")
        out[int(fields[0])] = {k: float(v) for k, v in (f.rsplit(" ", 1) for f in fields[1:])}
    return out


def megatron_lm_losses(stdout: str) -> dict[int, float]:
    """{iteration: lm loss} of Megatron-LM's own iteration lines."""
    import re

    found = re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)", stdout)
    return {int(i): float(v) for i, v in found}


def megatron_lm_values(stdout: str) -> dict[int, dict[str, float]]:
    """{iteration: {name: value}} of the numbers in Megatron-LM's own iteration lines (``lm loss``,
    ``load_balancing_loss``, ``z_loss``, ``grad norm``, ...)."""
    import re

    out = {}
    for line in stdout.splitlines():
        found = re.search(r"iteration\s+(\d+)/\s*\d+ \|(.*)", line)
        if found and "lm loss" in line:
            pairs = (f.split(": ", 1) for f in found.group(2).split(" | ") if ": " in f)
            out[int(found.group(1))] = {k.strip(): float(v) for k, v in pairs if re.fullmatch(r"[0-9.E+-]+", v.strip())}
    return out


def checkpoint_tensors(path: str | Path) -> dict:
    """Every tensor of a torch_dist checkpoint directory (model and optimizer state), read with torch's
    distributed-checkpoint reader alone: no process group, and whichever megatron-core wrote it."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata().state_dict_metadata
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()
               if isinstance(m, TensorStorageMetadata)}
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors
