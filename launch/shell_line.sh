# shellcheck shell=bash
# Sourced by the launchers (gpu_slurm.sh, tpu_pod.sh) for their --dry_run
# output, from the repository root.

# The words of a command as one line that a shell reads back the same.
shell_line() {
  local word line=""
  for word in "$@"; do
    if [[ "${word}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      line+=" ${word}"
    elif [[ "${word}" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      line+=" ${BASH_REMATCH[1]}'${BASH_REMATCH[2]//\'/\'\\\'\'}'"
    else
      line+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "${line# }"
}
