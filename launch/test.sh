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
# Two pytest-xdist workers (one per core of the CI machine), each taking whole
# test files (--dist=loadfile), so a file's module-scoped fixtures (the short
# training runs) are built once, not once per worker: 569 tests in 20 min on
# a 2-core EPYC (2026-11-30, from 23 min with per-test scheduling), 598 in
# 9.5-13 min on a 2-core AVX-512 Xeon (2026-11-30, 10:00-12:45).
# PYTEST_WORKERS=0 runs the tests in one process.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist=loadfile "$@"
