#!/usr/bin/env bash
# One command: install what is needed and pretrain the small GPT-MoE of examples/tiny_cpu.toml
# on the embedded corpus (this Python's standard-library source) with 2 processes and
# expert parallelism 2 (alltoall dispatcher). About 10 minutes on 2 CPU cores.
#
#   bash launch/quickstart.sh [extra moe-reg pretrain flags...]
#
# Installs into the active virtual environment, or creates .venv. On a machine without an
# NVIDIA GPU it installs the CPU build of torch (never the multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -d .venv ]] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install torch
  else
    python -m pip install "torch==2.13.0"
  fi
fi
python -m pip install -e .
PYTHON=python NPROC=${NPROC:-2} bash launch/torchrun.sh examples/tiny_cpu.toml \
  --expert-model-parallel-size "${EP:-2}" "$@"
