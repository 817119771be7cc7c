#!/usr/bin/env bash
# SLURM batch script: the main job on GPU nodes, one process per GPU.
#
#   sbatch [--nodes=2] [--gpus-per-node=4 --ntasks-per-node=4] \
#       [--partition=P] [--time=HH:MM:SS] launch/gpu_slurm.sh \
#       --config=configs/X.py[:arg] --workdir=DIR [--config.key=value ...]
#   GPUS=4 bash launch/gpu_slurm.sh --dry-run --config=... --workdir=...
#
# Submit from the repository root, on a file system that every node sees
# (the .venv, the data and --workdir are shared). The batch step sets up
# .venv with jax[cuda12] (REVERSE_SD_ACCELERATOR=cuda12 launch/setup.sh,
# which returns at once when nothing changed), then `srun` starts GPUS
# processes per node (GPUS: $GPUS, else the GPUs SLURM gave each node, else
# 8); JAX reads the SLURM environment (SLURM_NTASKS, SLURM_PROCID, ...) and
# gives each process the GPU of its SLURM_LOCALID. Every argument goes to
# `python -m reverse_sd.main`; --dry-run prints the commands instead.
#
# 120 s before the time limit SLURM sends SIGTERM (--signal below), as it
# does on preemption: the run saves a checkpoint and exits with status 75;
# this script then requeues the job (unless REQUEUE=0), which resumes from
# that checkpoint. Submitting the same command again resumes too.
#
#SBATCH --job-name=reverse_sd
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
# sbatch runs a copy of this script from its spool folder.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

dry_run=0
main_args=()
for arg in "$@"; do
  case "${arg}" in
    --dry-run|--dry_run) dry_run=1 ;;
    *) main_args+=("${arg}") ;;
  esac
done

fail() {
  echo "gpu_slurm.sh: $*" >&2
  exit 2
}
[[ -f launch/setup.sh ]] ||
  fail "run from the repository root (no launch/setup.sh in $(pwd))."
has_config=0
has_workdir=0
for arg in "${main_args[@]+"${main_args[@]}"}"; do
  case "${arg}" in
    --config=*) has_config=1 ;;
    --workdir=*) has_workdir=1 ;;
  esac
done
[[ "${has_config}" == 1 && "${has_workdir}" == 1 ]] ||
  fail "pass --config=configs/X.py[:arg] and --workdir=DIR (shared by all nodes)."
if [[ "${dry_run}" == 0 && -z "${SLURM_JOB_ID:-}" ]]; then
  fail "not inside a SLURM job: submit with 'sbatch launch/gpu_slurm.sh ARGS', or pass --dry-run."
fi

# reverse_sd.main.PREEMPTED_EXIT_CODE.
preempted_status=75
requeue="${REQUEUE:-1}"
gpus="${GPUS:-${SLURM_GPUS_ON_NODE:-8}}"
[[ "${gpus}" =~ ^[1-9][0-9]*$ ]] || fail "GPUS=${gpus}: expected a positive integer."

setup=(env REVERSE_SD_ACCELERATOR=cuda12 bash launch/setup.sh)
train=(srun "--ntasks-per-node=${gpus}"
       env TF_CPP_MIN_LOG_LEVEL=2
       .venv/bin/python -m reverse_sd.main "${main_args[@]}")

# shell_line: a command's words as one line a shell reads back the same.
# shellcheck source=launch/shell_line.sh disable=SC1091
source launch/shell_line.sh

if [[ "${dry_run}" == 1 ]]; then
  echo "cd $(pwd)"
  shell_line "${setup[@]}"
  shell_line "${train[@]}"
  echo "# exit status ${preempted_status} (preempted, checkpoint saved), REQUEUE=${requeue}: scontrol requeue \${SLURM_JOB_ID}"
  exit 0
fi

"${setup[@]}"
echo "gpu_slurm.sh: job ${SLURM_JOB_ID} on ${SLURM_JOB_NUM_NODES:-1} node(s), ${gpus} process(es) per node" >&2
status=0
"${train[@]}" || status=$?
if [[ "${status}" == "${preempted_status}" && "${requeue}" == 1 ]]; then
  echo "gpu_slurm.sh: preempted after a checkpoint; requeueing job ${SLURM_JOB_ID}" >&2
  scontrol requeue "${SLURM_JOB_ID}" || true
fi
exit "${status}"
