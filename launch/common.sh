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
