#!/usr/bin/env bash
# Every CPU benchmark, one after another, for an otherwise idle machine:
# train_step (JAX vs PyTorch; then the white-box SD 2.1 U-Net encoder, JAX
# only; then the ConvNet with XLA's own convolutions, JAX only; then the
# ConvNet with glibc's allocator defaults in every worker), kernels (the
# ConvNet's convolutions alone, the CPU kernel against XLA and PyTorch, 1
# and 2 threads), ab_step (the CPU convolution kernel and the micro-batched
# predict step, each A/B in one process), profile_step (where the JAX
# step's time goes), input_pipeline, scaling (8 fake devices vs 1) and
# dakl_scaling. Results go to benchmarks/results/*.json, the console output
# also to benchmarks/results/run_all.log.
#
#   bash benchmarks/run_all.sh            # about an hour on 2 cores
#   bash benchmarks/run_all.sh --quick    # smoke run of every script
#
# A failing benchmark does not stop the others; the exit status is 1 if any
# failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

quick=()
dakl=()
unet=(--output=benchmarks/results/train_step_unet.json)
xla=(--output=benchmarks/results/train_step_conv_xla.json)
log=benchmarks/results/run_all.log
for arg in "$@"; do
  case "${arg}" in
    --quick)
      quick=(--quick)
      dakl=('--sizes=200x400,400x800'
            --output=benchmarks/results/dakl_scaling_quick.json)
      unet=(--output=benchmarks/results/train_step_unet_quick.json)
      xla=(--output=benchmarks/results/train_step_conv_xla_quick.json)
      log=benchmarks/results/run_all_quick.log ;;
    *) echo "run_all.sh: unknown argument ${arg} (only --quick)" >&2; exit 2 ;;
  esac
done

python=.venv/bin/python
if [[ ! -x "${python}" ]]; then
  echo "run_all.sh: ${python} is missing; run bash launch/setup.sh" >&2
  exit 2
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
mkdir -p benchmarks/results
: > "${log}"

started=${SECONDS}
failed=()
run() {
  local name="$1"
  shift
  local t0=${SECONDS}
  echo "=== ${name}: $* ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "${log}"
  if "$@" 2>&1 | tee -a "${log}"; then
    echo "=== ${name}: done in $((SECONDS - t0)) s" | tee -a "${log}"
  else
    echo "=== ${name}: FAILED after $((SECONDS - t0)) s" | tee -a "${log}"
    failed+=("${name}")
  fi
}

run train_step "${python}" benchmarks/train_step.py "${quick[@]+"${quick[@]}"}"
run train_step_unet "${python}" benchmarks/train_step.py --cases=sd21_unet \
  --frameworks=jax --rounds=1 "${unet[@]}" "${quick[@]+"${quick[@]}"}"
run conv_xla "${python}" benchmarks/train_step.py --cases=convnet_small \
  --frameworks=jax --conv=xla "${xla[@]}" "${quick[@]+"${quick[@]}"}"
run malloc_glibc env REVERSE_SD_MALLOC_DEFAULTS=0 "${python}" \
  benchmarks/train_step.py --cases=convnet_small \
  --output=benchmarks/results/train_step_malloc_glibc${quick:+_quick}.json \
  "${quick[@]+"${quick[@]}"}"
run kernels "${python}" benchmarks/kernels.py "${quick[@]+"${quick[@]}"}"
run ab_conv "${python}" benchmarks/ab_step.py --change=conv \
  --cases=convnet_small --rounds=10 "${quick[@]+"${quick[@]}"}"
run ab_micro_batch "${python}" benchmarks/ab_step.py --change=micro_batch \
  --micro_batch=32 --output=benchmarks/results/ab_step_micro_batch${quick:+_quick}.json \
  --cases=convnet_small "${quick[@]+"${quick[@]}"}"
run profile_step "${python}" benchmarks/profile_step.py "${quick[@]+"${quick[@]}"}"
run input_pipeline "${python}" benchmarks/input_pipeline.py "${quick[@]+"${quick[@]}"}"
run scaling "${python}" benchmarks/scaling.py "${quick[@]+"${quick[@]}"}"
run dakl_scaling "${python}" benchmarks/dakl_scaling.py "${dakl[@]+"${dakl[@]}"}"

echo "=== total: $((SECONDS - started)) s" | tee -a "${log}"
if ((${#failed[@]})); then
  echo "=== failed: ${failed[*]}" | tee -a "${log}"
  exit 1
fi
