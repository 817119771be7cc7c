"""Helpers for tests that start `python -m reverse_sd.main` processes.

Each process logs to its own files (so a test can watch its progress
without pipes filling up); failures show the tail of every process's log.
"""

from collections.abc import Sequence
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

from configs import synthetic
from reverse_sd.data import datasets

REPO = pathlib.Path(__file__).resolve().parents[1]
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
SPLITS = ('train', 'validation', 'test', 'test_shifted')

_shared = {}


def tiny_config(data_dir, **train_overrides):
  """configs/synthetic.py:tiny reading `data_dir`, with train overrides."""
  config = synthetic.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = str(data_dir)
    for key, value in train_overrides.items():
      config.train[key] = value
  return config


def shared_data_dir(tmp_path_factory) -> pathlib.Path:
  """The tiny synthetic data set and its targets, built once per session.

  Built here, in the test process, so that processes started later only
  read it (several processes building one folder would race).
  """
  if 'data_dir' not in _shared:
    data_dir = tmp_path_factory.mktemp('shared_tiny_data')
    datasets.load_splits(tiny_config(data_dir), list(SPLITS))
    _shared['data_dir'] = data_dir
  return _shared['data_dir']


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def main_args(workdir, data_dir, **train_overrides) -> list[str]:
  """reverse_sd.main arguments for the tiny config with train overrides."""
  return ['--config=configs/synthetic.py:tiny', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}',
          *(f'--config.train.{k}={v}' for k, v in train_overrides.items())]


def subprocess_env(num_devices: int, **extra: str) -> dict[str, str]:
  """This environment with `num_devices` fake CPU devices per process."""
  env = dict(os.environ)
  flags = re.sub(DEVICE_COUNT_FLAG + r'=\d+', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = f'{flags} {DEVICE_COUNT_FLAG}={num_devices}'.strip()
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONUNBUFFERED='1', **extra)
  return env


class MainProcess:
  """One `python -m reverse_sd.main` process, logging to files."""

  def __init__(self, args: Sequence[str], log_dir: pathlib.Path, name: str,
               env: dict[str, str]):
    log_dir.mkdir(parents=True, exist_ok=True)
    self.name = name
    self.stdout_path = log_dir / f'{name}.stdout'
    self.stderr_path = log_dir / f'{name}.stderr'
    with open(self.stdout_path, 'wb') as out, open(self.stderr_path,
                                                   'wb') as err:
      self.popen = subprocess.Popen(
          [sys.executable, '-m', 'reverse_sd.main', *args], cwd=REPO,
          env=env, stdout=out, stderr=err)

  @property
  def stdout(self) -> str:
    return self.stdout_path.read_text(errors='replace')

  @property
  def stderr(self) -> str:
    return self.stderr_path.read_text(errors='replace')

  def tail(self, chars: int = 3000) -> str:
    err = '\n'.join(line for line in self.stderr.splitlines()
                    if not line.startswith('[Gloo]'))
    return (f'--- {self.name} (pid {self.popen.pid}, exit '
            f'{self.popen.returncode}) stderr tail:\n{err[-chars:]}\n'
            f'--- {self.name} stdout tail:\n{self.stdout[-chars // 3:]}')


def describe(processes: Sequence[MainProcess]) -> str:
  return '\n'.join(p.tail() for p in processes)


def wait_all(processes: Sequence[MainProcess], timeout_s: float) -> list[int]:
  """Exit codes of all processes; kills them all if one runs past timeout."""
  deadline = time.monotonic() + timeout_s
  try:
    for process in processes:
      process.popen.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    for process in processes:
      if process.popen.poll() is None:
        process.popen.kill()
        process.popen.wait()
    raise AssertionError(f'Processes ran past {timeout_s:.0f} s:\n'
                         f'{describe(processes)}') from None
  return [process.popen.returncode for process in processes]


def start_processes(args: Sequence[str], log_dir: pathlib.Path, *,
                    num_processes: int, devices_per_process: int,
                    **env_extra: str) -> list[MainProcess]:
  """`num_processes` processes of one job on localhost (one for 1)."""
  env = subprocess_env(devices_per_process, **env_extra)
  if num_processes == 1:
    return [MainProcess(args, log_dir, 'process0', env)]
  port = free_port()
  return [MainProcess([*args, f'--coordinator_address=localhost:{port}',
                       f'--num_processes={num_processes}',
                       f'--process_id={i}'], log_dir, f'process{i}', env)
          for i in range(num_processes)]


_TRAIN_LOG_STEP = re.compile(r'\[(\d+)\] train/')


def latest_logged_step(process: MainProcess) -> int:
  """The latest step whose train metrics the process has logged (0: none)."""
  steps = [int(s) for s in _TRAIN_LOG_STEP.findall(process.stderr)]
  return max(steps, default=0)


def wait_for_step(processes: Sequence[MainProcess], step: int,
                  timeout_s: float) -> None:
  """Waits until every process has logged train metrics of `step` or later."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if all(latest_logged_step(p) >= step for p in processes):
      return
    ended = [p for p in processes if p.popen.poll() is not None]
    if ended:
      raise AssertionError(f'A process ended before logging step {step}:\n'
                           f'{describe(processes)}')
    time.sleep(0.2)
  raise AssertionError(f'No process logged step {step} within '
                       f'{timeout_s:.0f} s:\n{describe(processes)}')
