"""The default job runs on a machine with no C++ compiler: the CPU kernels
(reverse_sd/ops/cpu/) are an optional speed-up, and without them the
convolutions run on xla, saying so once."""

import json
import os
import pathlib
import subprocess
import sys

from reverse_sd.ops.cpu import kernels as cpu_kernels

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_job_runs_without_a_compiler(tmp_path):
  bin_dir = tmp_path / 'bin'  # PATH: a python and nothing else (no g++).
  bin_dir.mkdir()
  for name in ('python', 'python3'):
    (bin_dir / name).symlink_to(sys.executable)
  cache = tmp_path / 'kernel_cache'  # Empty: no library built before.
  cache.mkdir()
  workdir = tmp_path / 'run'
  env = dict(os.environ, PATH=str(bin_dir), XLA_FLAGS='', JAX_PLATFORMS='cpu',
             **{cpu_kernels.CACHE_ENV: str(cache)})
  env.pop('CXX', None)
  # The venv's interpreter by its own path: a symlink elsewhere would not
  # find the venv's packages.
  proc = subprocess.run(
      [sys.executable, '-m', 'reverse_sd.main',
       '--config=configs/synthetic.py:tiny', f'--workdir={workdir}',
       f'--config.data.data_dir={tmp_path / "data"}',
       # Seconds: few prompts to embed, two steps.
       '--config.data.num_train=32', '--config.data.num_validation=16',
       '--config.data.num_test=16', '--config.data.num_test_shifted=16',
       '--config.eval.batch_size=16', '--config.train.num_steps=2'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / 'results.json').read_text())
  assert results['meta']['step'] == 2
  assert 'The CPU convolution kernel unavailable (' in proc.stderr, (
      'expected the warning of reverse_sd/ops/cpu/kernels.warn_unavailable; '
      f'stderr ends: {proc.stderr[-3000:]}')
  assert 'no C++ compiler' in proc.stderr
  assert '); using xla.' in proc.stderr
  assert not list(cache.iterdir())  # Nothing half-built left behind.
