# Shared by the launchers (sourced): print the command under DRY_RUN=1, else run it.
#
#   run_or_print RUN_DIR CMD...
run_or_print() {
  local run_dir=$1; shift
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"; echo
    exit 0
  fi
  mkdir -p "$run_dir"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  "$@"
}

# check_config PYTHON WORLD_SIZE PRETRAIN_ARGS...: the configuration and its inputs in one process before
# torchrun starts, so a bad flag or file is one line (exit status 2), not torchrun's failure report.
check_config() {
  local python=$1 world=$2; shift 2
  if [[ "${DRY_RUN:-0}" == 1 ]]; then return 0; fi
  "$python" -m megatron_moe_reg.cli check-config --world-size "$world" "$@" || exit 2
}
