#!/usr/bin/env bash
# Sets up (if needed) and runs the test suite on 8 fake CPU devices.
#
#   bash launch/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh

export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# Two pytest-xdist workers (one per core of the CI machine): the suite runs its
# 548 tests in 24-26 min this way on 2 cores (2026-11-30).
# PYTEST_WORKERS=0 runs them in one process.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
