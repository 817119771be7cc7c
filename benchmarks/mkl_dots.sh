#!/usr/bin/env bash
# A/B of Intel MKL's sgemm against XLA's dots for the Dense products of the
# ViT-B/16 train and predict steps (benchmarks/mkl_dots.py). MKL is not a
# dependency of reverse_sd (RESULTS.md says why): this script installs the
# `mkl` and `intel-openmp` wheels into a scratch environment, builds
# benchmarks/mkl_dots.cc against them and runs the A/B with .venv's JAX.
#
#   bash benchmarks/mkl_dots.sh                  # ~4 min on 2 cores (+1 to install)
#   bash benchmarks/mkl_dots.sh --quick          # smoke run, tiny shapes
#   bash benchmarks/mkl_dots.sh --against_torch  # train_step.py on ViT-B/16
#                                                # with MKL: ~20 min
#
# Needs launch/setup.sh's .venv, g++ and x86-64 (MKL has no other builds).
set -euo pipefail
cd "$(dirname "$0")/.."

MKL_ENV="${MKL_ENV:-${TMPDIR:-/tmp}/reverse_sd_mkl}"
MKL_VERSION=2026.2.0
if [[ "$(uname -m)" != x86_64 ]]; then
  echo "mkl_dots: MKL is x86-64 only; this is $(uname -m)" >&2
  exit 2
fi
if [[ ! -f "${MKL_ENV}/lib/libmkl_core.so.3" || ! -f "${MKL_ENV}/lib/libiomp5.so" ]]; then
  echo "mkl_dots: installing mkl and intel-openmp ${MKL_VERSION} into ${MKL_ENV}" >&2
  .venv/bin/python -m pip install --quiet --no-deps --prefix "${MKL_ENV}" \
      "mkl==${MKL_VERSION}" "intel-openmp==${MKL_VERSION}"
fi
library="${MKL_ENV}/libmkl_dots.so"
if [[ ! -f "${library}" || benchmarks/mkl_dots.cc -nt "${library}" ]]; then
  include="$(.venv/bin/python -c 'import jax; print(jax.ffi.include_dir())')"
  "${CXX:-g++}" -O2 -std=c++17 -shared -fPIC -w -I"${include}" \
      benchmarks/mkl_dots.cc -o "${library}.tmp" -L"${MKL_ENV}/lib" \
      -l:libmkl_intel_lp64.so.3 -l:libmkl_intel_thread.so.3 \
      -l:libmkl_core.so.3 -l:libiomp5.so -Wl,-rpath,"${MKL_ENV}/lib"
  mv "${library}.tmp" "${library}"
fi
.venv/bin/python benchmarks/mkl_dots.py --library="${library}" "$@"
