"""Errors a person reads: a user's mistake ends a command in one line.

Each command fails while its flags are parsed or its run is opened, before
any training, so these tests take seconds.
"""

import os
import pathlib
import subprocess
import sys

from PIL import Image
import pytest

from reverse_sd import cli

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run(module, args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300,
                        check=False)


def _last_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.strip()]
  return lines[-1] if lines else ''


def _assert_one_line_error(proc, *expected):
  """Exit status 1, no traceback, and stderr ending in `error: ...` that
  names each of `expected`."""
  tail = proc.stderr[-3000:]
  assert proc.returncode == 1, f'exit status {proc.returncode}:\n{tail}'
  assert 'Traceback' not in proc.stderr, (
      f'a traceback without --verbose:\n{tail}')
  last = _last_line(proc.stderr)
  assert 'error: ' in last, f'the last line is not the error:\n{tail}'
  for text in expected:
    assert text in last, f'{text!r} not in the error line {last!r}'


def _main_args(tmp_path, *args):
  return ['--config=configs/synthetic.py:tiny',
          f'--workdir={tmp_path / "run"}', *args]


def test_unknown_flag(tmp_path):
  proc = _run('reverse_sd.main', _main_args(tmp_path, '--lerning_rate=1'))
  _assert_one_line_error(proc, "Unknown command line flag 'lerning_rate'")
  assert not (tmp_path / 'run').exists()


def test_config_override_typo_names_the_key_and_a_suggestion(tmp_path):
  args = _main_args(tmp_path, '--config.optim.lrr=1')
  proc = _run('reverse_sd.main', args)
  _assert_one_line_error(proc, "'lrr'", '--config.optim.lrr=1', '"lr"')
  assert not (tmp_path / 'run').exists()

  verbose = _run('reverse_sd.main', [*args, '--verbose'])
  assert verbose.returncode == 1, verbose.stderr[-3000:]
  assert 'Traceback' in verbose.stderr, verbose.stderr[-3000:]
  assert "'lrr'" in _last_line(verbose.stderr), verbose.stderr[-3000:]


def test_unknown_config_argument(tmp_path):
  proc = _run('reverse_sd.main', ['--config=configs/synthetic.py:typo',
                                  f'--workdir={tmp_path / "run"}'])
  _assert_one_line_error(proc, 'configs/synthetic.py', "'typo'", "'tiny'")
  assert not (tmp_path / 'run').exists()


@pytest.fixture
def images(tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  Image.new('RGB', (8, 8)).save(folder / 'one.png')
  return folder


def test_predict_workdir_that_is_not_a_run(tmp_path, images):
  args = [f'--workdir={tmp_path}', str(images)]
  proc = _run('reverse_sd.predict', args)
  _assert_one_line_error(proc, f'{tmp_path}/config.json does not exist')

  verbose = _run('reverse_sd.predict', [*args, '--verbose'])
  assert verbose.returncode == 1, verbose.stderr[-3000:]
  assert 'Traceback' in verbose.stderr, verbose.stderr[-3000:]
  assert 'FileNotFoundError' in verbose.stderr, verbose.stderr[-3000:]
  assert 'config.json does not exist' in _last_line(verbose.stderr)


def test_one_line_keeps_the_last_line_of_an_embedded_traceback():
  message = ('flag --config=c.py:x: Error whilst parsing config file:\n\n'
             '  Traceback (most recent call last):\n'
             '    File "c.py", line 3, in get_config\n'
             "  ValueError: unknown size 'x'.\n")
  assert cli.one_line(message) == (
      'flag --config=c.py:x: Error whilst parsing config file: '
      "ValueError: unknown size 'x'.")
