#!/usr/bin/env bash
# Multi-node pretraining: run this on every node (or let launch/slurm.sbatch do it). The nodes meet
# through torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT, which also numbers them.
#
#   NNODES=4 MASTER_ADDR=node0 launch/torchrun_multinode.sh CONFIG.toml \
#       --data-path /data/corpus_text_document --tokenizer-model /data/tokenizer.model [flags...]
#
# Environment: NNODES, MASTER_ADDR (required); MASTER_PORT (29500), RDZV_ID (moe-reg-<config
# name>: the same on every node of one job), NPROC_PER_NODE (GPUs on the node), RUN_DIR
# (runs/<config name>; on a file system every node sees), DRY_RUN=1.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${1:?usage: launch/torchrun_multinode.sh CONFIG.toml [flags...]}; shift
NAME=$(basename "$CONFIG" .toml)
RUN_DIR=${RUN_DIR:-runs/$NAME}
PYTHON=${PYTHON:-python3}
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)}

ARGS=(--config "$CONFIG" --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints"
      --tensorboard-dir "$RUN_DIR/tensorboard" --log-file "$RUN_DIR/metrics.jsonl" "$@")
CMD=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE"
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-moe-reg-$NAME}"
     -m megatron_moe_reg.pretrain "${ARGS[@]}")

# shellcheck source=launch/common.sh
source launch/common.sh
check_config "$PYTHON" "$((NNODES * NPROC_PER_NODE))" "${ARGS[@]}"
run_or_print "$RUN_DIR" "${CMD[@]}"
