#!/usr/bin/env bash
# Every CPU benchmark, one after another, for an otherwise idle machine:
# train_step (JAX vs PyTorch; then the white-box SD 2.1 U-Net encoder, JAX
# only; then the ConvNet with XLA's own convolution gradients, JAX only; then
# both cases with the opt-in oneDNN flags, JAX only; then the ConvNet with
# glibc's allocator defaults in every worker), kernels (the steps'
# kernels alone, JAX against PyTorch, 1 and 2 threads; then JAX with XLA's
# own YNNPACK choice), ab_step (the Dense, micro-batch and YNNPACK
# changes, XLA's convolution gradients, attention, LayerNorm, bias
# gradients and the gradient norm, each A/B in one process),
# profile_step (where the JAX step's time goes), input_pipeline, scaling
# (8 fake devices vs 1) and dakl_scaling. Results go to
# benchmarks/results/*.json, the console output also to
# benchmarks/results/run_all.log.
#
#   bash benchmarks/run_all.sh            # 43-46 min (2-core Xeon), ~90 (2-core EPYC)
#   bash benchmarks/run_all.sh --quick    # smoke run of every script
#
# A failing benchmark does not stop the others; the exit status is 1 if any
# failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

quick=()
dakl=()
unet=(--output=benchmarks/results/train_step_unet.json)
xla=(--output=benchmarks/results/train_step_conv_grad_xla.json)
onednn=(--output=benchmarks/results/train_step_onednn.json)
kernels_ynn=(--output=benchmarks/results/kernels_xla_ynn.json)
log=benchmarks/results/run_all.log
for arg in "$@"; do
  case "${arg}" in
    --quick)
      quick=(--quick)
      dakl=('--sizes=200x400,400x800'
            --output=benchmarks/results/dakl_scaling_quick.json)
      unet=(--output=benchmarks/results/train_step_unet_quick.json)
      xla=(--output=benchmarks/results/train_step_conv_grad_xla_quick.json)
      onednn=(--output=benchmarks/results/train_step_onednn_quick.json)
      kernels_ynn=(--output=benchmarks/results/kernels_xla_ynn_quick.json)
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
run conv_grad_xla "${python}" benchmarks/train_step.py --cases=convnet_small \
  --frameworks=jax --conv_grad=xla "${xla[@]}" "${quick[@]+"${quick[@]}"}"
run onednn env REVERSE_SD_XLA_CPU_ONEDNN=1 "${python}" \
  benchmarks/train_step.py --frameworks=jax --rounds=1 "${onednn[@]}" \
  "${quick[@]+"${quick[@]}"}"
run malloc_glibc env REVERSE_SD_MALLOC_DEFAULTS=0 "${python}" \
  benchmarks/train_step.py --cases=convnet_small \
  --output=benchmarks/results/train_step_malloc_glibc${quick:+_quick}.json \
  "${quick[@]+"${quick[@]}"}"
run kernels "${python}" benchmarks/kernels.py "${quick[@]+"${quick[@]}"}"
run kernels_xla_ynn env REVERSE_SD_XLA_CPU_DEFAULTS=0 "${python}" \
  benchmarks/kernels.py --frameworks=jax "${kernels_ynn[@]}" \
  "${quick[@]+"${quick[@]}"}"
run ab_ynn_vit env REVERSE_SD_XLA_CPU_DEFAULTS=0 "${python}" \
  benchmarks/ab_step.py --change=ynn --cases=vit_b16 \
  --output=benchmarks/results/ab_step_ynn_vit_b16${quick:+_quick}.json \
  "${quick[@]+"${quick[@]}"}"
run ab_ynn_convnet env REVERSE_SD_XLA_CPU_DEFAULTS=0 "${python}" \
  benchmarks/ab_step.py --change=ynn --cases=convnet_small --rounds=20 \
  --output=benchmarks/results/ab_step_ynn_convnet_small${quick:+_quick}.json \
  "${quick[@]+"${quick[@]}"}"
run ab_ynn_dots_convnet "${python}" benchmarks/ab_step.py --change=ynn_dots \
  --cases=convnet_small --rounds=20 \
  --output=benchmarks/results/ab_step_ynn_dots_convnet_small${quick:+_quick}.json \
  "${quick[@]+"${quick[@]}"}"
run ab_ynn_dots_vit "${python}" benchmarks/ab_step.py --change=ynn_dots \
  --cases=vit_b16 \
  --output=benchmarks/results/ab_step_ynn_dots_vit_b16${quick:+_quick}.json \
  "${quick[@]+"${quick[@]}"}"
run ab_dense "${python}" benchmarks/ab_step.py --change=dense \
  "${quick[@]+"${quick[@]}"}"
run ab_micro_batch "${python}" benchmarks/ab_step.py --change=micro_batch \
  --micro_batch=32 --output=benchmarks/results/ab_step_micro_batch${quick:+_quick}.json \
  --cases=convnet_small "${quick[@]+"${quick[@]}"}"
run ab_conv_grad "${python}" benchmarks/ab_step.py --change=conv_grad \
  --cases=convnet_small --rounds=20 "${quick[@]+"${quick[@]}"}"
run ab_conv_grad_matmul "${python}" benchmarks/ab_step.py \
  --change=conv_grad_matmul --cases=convnet_small --rounds=20 \
  "${quick[@]+"${quick[@]}"}"
run ab_attention "${python}" benchmarks/ab_step.py --change=attention \
  --cases=vit_b16 "${quick[@]+"${quick[@]}"}"
run ab_layer_norm "${python}" benchmarks/ab_step.py --change=layer_norm \
  --cases=vit_b16 "${quick[@]+"${quick[@]}"}"
run ab_bias_grad "${python}" benchmarks/ab_step.py --change=bias_grad \
  --cases=vit_b16 "${quick[@]+"${quick[@]}"}"
run ab_grad_norm "${python}" benchmarks/ab_step.py --change=grad_norm \
  --cases=convnet_small --rounds=20 "${quick[@]+"${quick[@]}"}"
run profile_step "${python}" benchmarks/profile_step.py "${quick[@]+"${quick[@]}"}"
run input_pipeline "${python}" benchmarks/input_pipeline.py "${quick[@]+"${quick[@]}"}"
run scaling "${python}" benchmarks/scaling.py "${quick[@]+"${quick[@]}"}"
run dakl_scaling "${python}" benchmarks/dakl_scaling.py "${dakl[@]+"${dakl[@]}"}"

echo "=== total: $((SECONDS - started)) s" | tee -a "${log}"
if ((${#failed[@]})); then
  echo "=== failed: ${failed[*]}" | tee -a "${log}"
  exit 1
fi
