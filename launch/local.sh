#!/usr/bin/env bash
# Sets up (if needed) and runs the main job on one machine.
#
#   bash launch/local.sh [--workdir=DIR] [--config=configs/X.py[:arg]] \
#       [--config.key=value ...]
#
# Defaults: --config=configs/synthetic.py --workdir=runs/synthetic. Rerunning
# with the same workdir resumes from the latest checkpoint. On a GPU or TPU
# host launch/setup.sh installs the JAX for it and the job runs there
# (REVERSE_SD_ACCELERATOR=cpu|cuda12|tpu overrides the detection).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh

config="configs/synthetic.py"
workdir="runs/synthetic"
passthrough=()
for arg in "$@"; do
  case "${arg}" in
    --config=*) config="${arg#--config=}" ;;
    --workdir=*) workdir="${arg#--workdir=}" ;;
    *) passthrough+=("${arg}") ;;
  esac
done

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python -m reverse_sd.main --config="${config}" \
  --workdir="${workdir}" "${passthrough[@]+"${passthrough[@]}"}"
