#!/usr/bin/env bash
# Opens an HTML report in headless Chromium and saves a screenshot of it.
#
#   bash tools/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]
#
# Fails (status 1) when Chromium is missing (launch/setup.sh installs it),
# when no screenshot is written, or when the page logs a console message
# (a script error or a resource that failed to load: a report is
# self-contained and has no script, so it must log none). Chromium's own
# log goes to OUT.png.log.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
  exit 2
fi
report="$(realpath "$1")"
out="$(realpath -m "$2")"
size="${3:-1280,2000}"
log="${out}.log"

browser=""
for name in chromium chromium-browser google-chrome; do
  if command -v "${name}" >/dev/null 2>&1; then
    browser="${name}"
    break
  fi
done
if [[ -z "${browser}" ]]; then
  echo "screenshot_report: no chromium found; run launch/setup.sh (it installs it)." >&2
  exit 1
fi
if [[ ! -f "${report}" ]]; then
  echo "screenshot_report: ${report} does not exist." >&2
  exit 1
fi

profile="$(mktemp -d)"
trap 'rm -rf "${profile}"' EXIT
rm -f "${out}"
mkdir -p "$(dirname "${out}")"
# --no-sandbox: CI runs as root; a fresh profile keeps runs independent.
status=0
timeout 120 "${browser}" --headless --no-sandbox --disable-gpu \
  --user-data-dir="${profile}" --no-first-run --hide-scrollbars \
  --enable-logging=stderr --v=0 --window-size="${size}" \
  --screenshot="${out}" "file://${report}" >"${log}" 2>&1 || status=$?
if [[ ${status} -ne 0 || ! -s "${out}" ]]; then
  echo "screenshot_report: ${browser} failed (status ${status}) or wrote no ${out}; see ${log}:" >&2
  tail -n 20 "${log}" >&2
  exit 1
fi
if grep -E ':CONSOLE|Uncaught' "${log}" >&2; then
  echo "screenshot_report: ${report} logged the console messages above." >&2
  exit 1
fi
echo "${out}"
