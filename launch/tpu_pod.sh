#!/usr/bin/env bash
# Runs the main job on every worker of a Cloud TPU VM pod slice, one process
# per worker; JAX finds the other workers itself (--multihost=on).
#
#   bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=PROJECT] \
#       [--repo_dir=DIR] [--dry-run] \
#       --config=configs/X.py[:arg] --workdir=DIR [--config.key=value ...]
#
# --tpu and --zone default to $TPU_NAME and $ZONE. Every other argument goes
# to `python -m reverse_sd.main`. --dry-run prints the gcloud command instead
# of running it.
#
# Before the first run, put this repository on every worker at --repo_dir
# (default: reverse_sd, under the login directory), e.g.
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \
#       --command='git clone REPO_URL reverse_sd'
# Each worker then sets up .venv with jax[tpu] on first use
# (REVERSE_SD_ACCELERATOR=tpu launch/setup.sh, which returns at once when
# nothing changed).
# --workdir (and config.data.data_dir, unless each worker may build its own
# copy) must be on a file system that every worker sees, e.g. an NFS
# (Filestore) or gcsfuse mount: Orbax writes one checkpoint from all workers.
# Rerunning the same command resumes from the latest checkpoint; a preempted
# run (SIGTERM) saves one first.
set -euo pipefail
cd "$(dirname "$0")/.."

tpu="${TPU_NAME:-}"
zone="${ZONE:-}"
project=""
repo_dir="reverse_sd"
dry_run=0
main_args=()
for arg in "$@"; do
  case "${arg}" in
    --tpu=*) tpu="${arg#--tpu=}" ;;
    --zone=*) zone="${arg#--zone=}" ;;
    --project=*) project="${arg#--project=}" ;;
    --repo_dir=*) repo_dir="${arg#--repo_dir=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    *) main_args+=("${arg}") ;;
  esac
done

fail() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}
[[ -n "${tpu}" ]] || fail "no TPU: pass --tpu=NAME or set TPU_NAME."
[[ -n "${zone}" ]] || fail "no zone: pass --zone=ZONE or set ZONE."
has_config=0
has_workdir=0
for arg in "${main_args[@]+"${main_args[@]}"}"; do
  case "${arg}" in
    --config=*) has_config=1 ;;
    --workdir=*) has_workdir=1 ;;
  esac
done
[[ "${has_config}" == 1 && "${has_workdir}" == 1 ]] ||
  fail "pass --config=configs/X.py[:arg] and --workdir=DIR (shared by all workers)."

# The command each worker runs; every argument quoted for the remote shell.
quoted_args="$(printf ' %q' "${main_args[@]}")"
remote="cd $(printf '%q' "${repo_dir}")"
remote+=" && REVERSE_SD_ACCELERATOR=tpu bash launch/setup.sh"
remote+=" && TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m reverse_sd.main"
remote+=" --multihost=on${quoted_args}"

command=(gcloud compute tpus tpu-vm ssh "${tpu}" "--zone=${zone}")
if [[ -n "${project}" ]]; then
  command+=("--project=${project}")
fi
command+=(--worker=all "--command=${remote}")

# shell_line: a command's words as one line a shell reads back the same.
# shellcheck source=launch/shell_line.sh disable=SC1091
source launch/shell_line.sh

if [[ "${dry_run}" == 1 ]]; then
  shell_line "${command[@]}"
  exit 0
fi
exec "${command[@]}"
