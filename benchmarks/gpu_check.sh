#!/usr/bin/env bash
# The GPU check: every GPU-only figure and test of the project in one run of about five minutes, on a
# machine without network (one CUDA GPU, Python 3.12, torch with CUDA, Triton; no megatron-core).
#
#   bash benchmarks/gpu_check.sh --prepare     # on a machine with network: wheels into .cache/gpu-wheels
#   bash benchmarks/gpu_check.sh               # on the GPU machine: install offline, run every step
#   bash benchmarks/gpu_check.sh --only STEP   # rerun one step (install runs first when needed)
#   bash benchmarks/gpu_check.sh --dry-run     # check the steps' commands, files and time boxes
#
# PYTHON names the interpreter that holds torch (default python3).
#
# Steps (each time-boxed; all of them append to one results file, $OUT/gpu_check.md or
# ./gpu_check.md):
#   install       the cp312 wheels into .cache/gpu-site with pip --no-index --no-deps --target
#   pytest        tests marked gpu: compiled grouped-GEMM kernels, torch._grouped_mm, R_sp's Gram
#                 kernels against the references, fp32 and bf16
#   grouped_gemm  benchmarks/grouped_gemm_speed.py at the GPU shapes (TFLOP/s, fraction of a dense
#                 bf16 matmul, speed-up over sequential, peak memory)
#   training      a bf16 mid-size GPT-MoE (examples/gpu_mid.toml): R_sp + R_cp on vs off with the
#                 triton and the sequential experts, step time and memory side by side; then a
#                 non-log step watched for host synchronizations (tests/sync_watch.py)
#   megatron_lm   Megatron-LM's pretrain() through moe-reg megatron-lm for a few steps
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=${GPU_CHECK_WHEELS:-.cache/gpu-wheels}
SITE=.cache/gpu-site
RESULTS=${OUT:-$ROOT}/gpu_check.md
PY=${PYTHON:-python3}  # the interpreter that holds torch (a GPU image need not have a plain "python")
STEPS=(install pytest grouped_gemm training megatron_lm)
declare -A BOX=([install]=15 [pytest]=90 [grouped_gemm]=75 [training]=80 [megatron_lm]=40)  # seconds
# cp312 wheels the GPU machine lacks (it has torch, triton, numpy, sentencepiece, tensorboard,
# matplotlib, pytest); Megatron-LM's megatron.training also needs six, regex, pydantic, pyyaml, einops
PURE=(megatron-core==0.19.2 six einops pytest-timeout pytest-xdist execnet packaging tqdm)
BINARY=(regex pyyaml psutil)  # psutil: megatron-core's checkpoint writer
WITH_DEPS=(pydantic)  # resolved with its dependencies: pydantic pins its pydantic-core
# the training step's model: the benchmark's arguments with each expert backend, and the watched
# run's pretrain flags (10 iterations would end the config's 10 warm-up iterations; the ERMoE router
# with both router penalties, so that its QR and power iterations are watched too)
BENCH=(--config examples/gpu_mid.toml --vocab-size 32768)
BENCH_TRITON=("${BENCH[@]}" -- --moe-grouped-gemm-backend triton)
BENCH_SEQUENTIAL=("${BENCH[@]}" -- --moe-grouped-gemm-backend sequential)
WATCH=(--mock-data "${BENCH[@]}" --train-iters 20 --log-interval 5 --eval-iters 0
       --moe-specialization-loss-coeff 2e-3 --moe-coupling-loss-coeff 1e-3 --moe-grouped-gemm-backend triton
       --moe-router-type ermoe --moe-eigen-rank 16 --moe-router-spectral-penalty-coeff 1e-2
       --moe-router-stable-rank-coeff 1e-2)

step_command() {  # the command of a step, one string (the dry run parses it)
  case $1 in
    install) echo "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE $WHEELS/*.whl" ;;
    # four workers: the fp32 and the bf16 tests compile their Triton kernels side by side (tens of
    # compilations of a few seconds each; the later steps find them in Triton's cache)
    pytest) echo "$PY -m pytest -q -n 4 -m gpu tests/test_grouped_experts_gpu.py tests/test_specialization_gpu.py" ;;
    grouped_gemm) echo "$PY benchmarks/grouped_gemm_speed.py --rounds 3 --json ${OUT:-$ROOT}/grouped_gemm.json \
&& $PY benchmarks/gram_kernel_speed.py --rounds 5" ;;
    training) echo "$PY benchmarks/loss_overhead.py --rounds 3 --no-memory --profile-steps 2 ${BENCH_TRITON[*]} \
&& $PY benchmarks/loss_overhead.py --rounds 3 --no-memory --profile-steps 0 ${BENCH_SEQUENTIAL[*]} \
&& $PY tests/sync_watch.py ${OUT:-$ROOT}/sync ${WATCH[*]} && cat ${OUT:-$ROOT}/sync/sync_calls.json" ;;
    megatron_lm) echo "$PY -m pytest -q -m gpu tests/test_megatron_lm_addon_gpu.py" ;;
  esac
}

files_of() {  # files a step needs
  case $1 in
    install) echo "$WHEELS" ;;
    pytest) echo "tests/test_grouped_experts_gpu.py tests/test_specialization_gpu.py" ;;
    grouped_gemm) echo "benchmarks/grouped_gemm_speed.py benchmarks/gram_kernel_speed.py" ;;
    training) echo "benchmarks/loss_overhead.py tests/sync_watch.py examples/gpu_mid.toml" ;;
    megatron_lm) echo "tests/test_megatron_lm_addon_gpu.py" ;;
  esac
}

prepare() {
  mkdir -p "$WHEELS"
  local platform=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform[@]}" -d "$WHEELS" "${PURE[@]}" "${BINARY[@]}"
  "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform[@]}" -d "$WHEELS" "${WITH_DEPS[@]}"
  ls "$WHEELS"
}

check_flags() {  # a command of the training step parses its configuration (sets the dry run's status)
  TRITON_INTERPRET=1 "$PY" "$@" || { echo "dry-run: step training: its configuration does not parse: $*"; status=1; }
}

dry_run() {
  local total=0 status=0
  command -v "$PY" >/dev/null || { echo "dry-run: no interpreter $PY (set PYTHON)"; status=1; }
  for step in "${STEPS[@]}"; do
    local cmd; cmd=$(step_command "$step")
    if ! bash -n <(echo "$cmd"); then echo "dry-run: step $step: its command does not parse"; status=1; fi
    for f in $(files_of "$step"); do
      if [[ ! -e $f ]]; then echo "dry-run: step $step needs $f (run --prepare first?)"; status=1; fi
    done
    total=$((total + BOX[$step]))
    echo "dry-run: $step (${BOX[$step]} s): $cmd"
  done
  # the training step's runs parse their configurations as they will (triton checked as on a GPU)
  check_flags benchmarks/loss_overhead.py --check-config "${BENCH_TRITON[@]}"
  check_flags benchmarks/loss_overhead.py --check-config "${BENCH_SEQUENTIAL[@]}"
  check_flags -m megatron_moe_reg.cli check-config --world-size 1 "${WATCH[@]}"
  echo "dry-run: time boxes add up to $total s"
  if ((total > 300)); then echo "dry-run: more than five minutes"; status=1; fi
  return $status
}

run_step() {
  local step=$1 cmd; cmd=$(step_command "$step")
  local started=$SECONDS rc=0 log; log=$(mktemp)
  echo "== $step (at most ${BOX[$step]} s)"
  timeout "${BOX[$step]}" bash -c "$cmd" >"$log" 2>&1 || rc=$?
  {
    echo "## $step: $([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc$([[ $rc == 124 ]] && echo ', time box'))"), $((SECONDS - started)) s"
    echo
    echo '```'
    tail -n 60 "$log"
    echo '```'
    echo
  } >>"$RESULTS"
  tail -n 5 "$log"
  rm -f "$log"
  return $rc
}

main() {
  case ${1:-} in
    --prepare) prepare; return ;;
    --dry-run) dry_run; return ;;
  esac
  local steps=("${STEPS[@]}")
  if [[ ${1:-} == --only ]]; then
    [[ -n ${BOX[${2:-}]:-} ]] || { echo "gpu_check: --only needs one of: ${STEPS[*]}"; return 2; }
    steps=("$2")
    [[ $2 != install && ! -d $SITE ]] && steps=(install "$2")
  fi
  export PYTHONPATH="$ROOT:$ROOT/$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  # Triton's autotuning results on disk: the training step's three processes (and Megatron-LM's run)
  # time each kernel's configurations at a shape once, not once per process
  export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
  {
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
    echo
  } >>"$RESULTS"
  local failed=()
  for step in "${steps[@]}"; do run_step "$step" || failed+=("$step"); done
  echo "results: $RESULTS"
  if ((${#failed[@]})); then echo "failed: ${failed[*]} (rerun: --only STEP)"; return 1; fi
}

main "$@"
