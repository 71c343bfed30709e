#!/usr/bin/env bash
# Single-node pretraining with torchrun.
#
#   launch/torchrun.sh [CONFIG.toml] [extra moe-reg pretrain flags...]
#
# Environment (all optional):
#   NPROC     processes (default: number of GPUs, or 2 on a CPU machine)
#   DATA_DIR  dataset written by 'moe-reg prepare-data' (default: data/stdlib; built from the
#             embedded corpus when missing). Ignored when the flags give --data-path or
#             --train-data-path yourself.
#   RUN_DIR   checkpoints, TensorBoard logs and metrics (default: runs/<config name>)
#   DRY_RUN=1 print the command instead of running it
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=examples/tiny_cpu.toml
if [[ $# -gt 0 && "$1" == *.toml ]]; then CONFIG=$1; shift; fi
NAME=$(basename "$CONFIG" .toml)
RUN_DIR=${RUN_DIR:-runs/$NAME}
DATA_DIR=${DATA_DIR:-data/stdlib}
PYTHON=${PYTHON:-python3}

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
fi

DATA_FLAGS=()
if [[ " $* " != *" --data-path "* && " $* " != *" --train-data-path "* && " $* " != *" --mock-data "* ]]; then
  if [[ ! -f "$DATA_DIR/manifest.json" && "${DRY_RUN:-0}" != 1 ]]; then
    "$PYTHON" -m megatron_moe_reg.cli prepare-data --output-dir "$DATA_DIR" --vocab-size "${VOCAB_SIZE:-4096}"
  fi
  DATA_FLAGS=(--tokenizer-model "$DATA_DIR/tokenizer.model"
              --train-data-path "$DATA_DIR/train_text_document"
              --valid-data-path "$DATA_DIR/valid_text_document")
fi

ARGS=(--config "$CONFIG" "${DATA_FLAGS[@]}" --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints"
      --tensorboard-dir "$RUN_DIR/tensorboard" --log-file "$RUN_DIR/metrics.jsonl" "$@")
CMD=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_moe_reg.pretrain "${ARGS[@]}")

# shellcheck source=launch/common.sh
source launch/common.sh
check_config "$PYTHON" "$NPROC" "${ARGS[@]}"
run_or_print "$RUN_DIR" "${CMD[@]}"
echo "TensorBoard: tensorboard --logdir $RUN_DIR/tensorboard    checkpoints: $RUN_DIR/checkpoints"
