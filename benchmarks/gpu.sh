#!/usr/bin/env bash
# CLIP ViT-L/14 (224 px) and the SD 2.1-shape U-Net encoder (512-px images as
# 64x64x4 latents) on one GPU, in bfloat16, train batch 32 (inference 64):
# the attention kernel each model's op resolved to (config.model.attention
# 'auto': cuDNN's fused attention on GPU) and the fused-attention custom
# calls in the compiled train step ('__cudnn$fmha...', a Triton kernel, or
# none), img/s, MFU against a bf16 8192^3 matmul peak measured first, and
# the device's peak memory. Aims at under 8 minutes on an H100/H200,
# environment included.
#
#   bash benchmarks/gpu.sh            # -> benchmarks/results/gpu.json
#   bash benchmarks/gpu.sh --quick    # CPU smoke: the tiny ViT, a minute
#
# Environment: the first of
#   $BENCH_VENV                  a ready virtualenv (jax with its GPU plugin);
#   .venv                        with --quick only (the CPU environment);
#   /tmp/venv                    made here by launch/setup.sh with
#                                REVERSE_SD_ACCELERATOR=cuda12, from PyPI or
#                                from the wheels in $WHEELHOUSE (offline).
# Optional: $TORCH_PYTHON, a python with CUDA torch and transformers 5, adds
# the PyTorch rows of the ViT (eager and torch.compile, autocast bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
started=${SECONDS}

quick=0
for arg in "$@"; do
  case "${arg}" in
    --quick) quick=1 ;;
    *) echo "gpu.sh: unknown argument ${arg} (only --quick)" >&2; exit 2 ;;
  esac
done

venv="${BENCH_VENV:-}"
if [[ -z "${venv}" ]]; then
  if [[ ${quick} == 1 && -x .venv/bin/python ]]; then
    venv=.venv
  else
    venv=/tmp/venv
  fi
fi
needed='import jax, flax, optax, clu, grain, tensorflow_datasets, ml_collections'

if ! "${venv}/bin/python" -c "${needed}" >/dev/null 2>&1; then
  echo "gpu.sh: installing the environment into ${venv} (a few minutes)" >&2
  if [[ -n "${WHEELHOUSE:-}" ]]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="${WHEELHOUSE}"
  fi
  if ! VENV="${venv}" REVERSE_SD_ACCELERATOR=cuda12 REVERSE_SD_SKIP_CHROMIUM=1 \
      bash launch/setup.sh; then
    cat >&2 <<EOF
gpu.sh: ERROR: launch/setup.sh could not install the cuda12 environment
into ${venv} (no route to PyPI from this machine?). Either
  - on a machine with network access: pip download -d WHEELS
    -r requirements.txt -r requirements-nodeps.txt 'jax[cuda12]' (the jax
    version of requirements.txt, same Python and platform), copy WHEELS here
    and rerun with WHEELHOUSE=WHEELS; or
  - rerun with BENCH_VENV=/path/to/a/venv made by
    REVERSE_SD_ACCELERATOR=cuda12 bash launch/setup.sh.
EOF
    exit 3
  fi
fi
python="${venv}/bin/python"
echo "gpu.sh: environment ready after $((SECONDS - started)) s (${python})" >&2

backend="$("${python}" -c 'import jax; print(jax.default_backend())' 2>/dev/null || true)"
if [[ ${quick} == 0 && "${backend}" != gpu ]]; then
  echo "gpu.sh: ERROR: JAX's backend is '${backend}', not gpu: the jax[cuda12]" \
    "plugin did not load (check nvidia-smi, the driver's CUDA 12 support, and" \
    "'${python} -c \"import jax; print(jax.devices())\"')." >&2
  exit 4
fi

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cases='vit_l14:32:64,sd21_unet:32:64'
frameworks=jax
torch_args=()
if [[ -n "${TORCH_PYTHON:-}" ]]; then
  frameworks=jax,torch_eager,torch_compile
  device=cuda
  [[ ${quick} == 0 ]] || device=cpu
  torch_args=(--torch_python="${TORCH_PYTHON}" --torch_device="${device}")
fi
output=benchmarks/results/gpu.json
mode_args=(--rounds=1 --warmup=3 --steps=10 --infer_warmup=2 --infer_steps=10
           --worker_timeout=300)
if [[ ${quick} == 1 ]]; then
  output=benchmarks/results/gpu_quick.json
  # The ViT only: the tiny U-Net alone takes minutes to compile on CPU.
  cases='vit_l14'
  mode_args=(--quick --worker_timeout=300)
fi

"${python}" benchmarks/train_step.py --cases="${cases}" \
  --frameworks="${frameworks}" --dtype=bfloat16 --matmul_size=8192 \
  --no-verify --output="${output}" "${mode_args[@]}" \
  "${torch_args[@]+"${torch_args[@]}"}"

elapsed=$((SECONDS - started))
echo "gpu.sh: total ${elapsed} s"
if ((elapsed > 480)); then
  echo "gpu.sh: WARNING: over the 8-minute budget; lower the batches in" \
    "'cases' in benchmarks/gpu.sh." >&2
fi
