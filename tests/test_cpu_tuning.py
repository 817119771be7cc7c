"""CPU process set-up: glibc keeps freed blocks mapped
(reverse_sd/ops/cpu/tuning.py).

mallopt changes the whole process, so every call that may set something
runs in a fresh subprocess.
"""

import ctypes
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from reverse_sd.ops.cpu import tuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'
SETTINGS = {'M_MMAP_THRESHOLD': str(2**31 - 1),
            'M_TRIM_THRESHOLD': str(2**31 - 1), 'M_ARENA_MAX': '1'}


def _run(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  # glibc's defaults in the child unless `env` says otherwise.
  child_env = {name: value for name, value in os.environ.items()
               if not name.startswith('MALLOC_') and name != 'GLIBC_TUNABLES'
               and name != tuning.DEFAULTS_ENV}
  child_env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO, **env)
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code), *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        check=True, env=child_env)


def test_skip_reasons():
  assert tuning.skip_reason({}) is None or not GLIBC
  assert 'REVERSE_SD_MALLOC_DEFAULTS=0' in tuning.skip_reason(
      {'REVERSE_SD_MALLOC_DEFAULTS': '0'})
  assert 'MALLOC_TRIM_THRESHOLD_ is set' in tuning.skip_reason(
      {'MALLOC_TRIM_THRESHOLD_': '0'})
  assert 'glibc.malloc' in tuning.skip_reason(
      {'GLIBC_TUNABLES': 'glibc.malloc.mmap_threshold=65536'})
  assert 'MALLOC_ARENA_MAX is set' in tuning.skip_reason(
      {'MALLOC_ARENA_MAX': '4'})
  with pytest.warns(UserWarning, match='REVERSE_SD_MALLOC_DEFAULTS'):
    tuning.skip_reason({'REVERSE_SD_MALLOC_DEFAULTS': 'maybe'})


def test_subprocess_env():
  assert tuning.subprocess_env({'REVERSE_SD_MALLOC_DEFAULTS': '0'}) == {}
  if GLIBC:
    assert tuning.subprocess_env({}) == {
        'MALLOC_MMAP_THRESHOLD_': str(2**31 - 1),
        'MALLOC_TRIM_THRESHOLD_': str(2**31 - 1), 'MALLOC_ARENA_MAX': '1'}


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
def test_an_accelerator_process_is_left_as_it_is(backend, monkeypatch):
  # No mallopt call at all: the CDLL it would come from is never opened.
  opened = []
  monkeypatch.setattr(ctypes, 'CDLL', lambda *a, **k: opened.append(a))
  applied = tuning.applied()
  assert tuning.tune_process(backend) == {}
  assert not opened
  assert tuning.applied() == applied


@pytest.mark.skipif(not GLIBC, reason='glibc only')
def test_a_cpu_process_gets_the_malloc_settings_and_logs_them():
  result = _run('''
      import json
      from absl import logging
      from reverse_sd.ops.cpu import tuning
      logging.set_verbosity(logging.INFO)
      print(json.dumps([tuning.tune_process('cpu'), tuning.applied()]))
  ''')
  done, applied = json.loads(result.stdout.splitlines()[-1])
  assert done == applied == SETTINGS
  assert ('tune_process: glibc malloc M_MMAP_THRESHOLD=2147483647, '
          'M_TRIM_THRESHOLD=2147483647, M_ARENA_MAX=1') in result.stderr


@pytest.mark.parametrize('env,reason', [
    ({'REVERSE_SD_MALLOC_DEFAULTS': '0'}, 'REVERSE_SD_MALLOC_DEFAULTS=0'),
    ({'MALLOC_ARENA_MAX': '4'}, 'MALLOC_ARENA_MAX is set')])
def test_the_users_choice_wins_and_is_logged(env, reason):
  result = _run('''
      import json
      from absl import logging
      from reverse_sd.ops.cpu import tuning
      logging.set_verbosity(logging.INFO)
      print(json.dumps(tuning.tune_process('cpu')))
  ''', **env)
  assert json.loads(result.stdout.splitlines()[-1]) == {}
  assert f'tune_process: malloc left as it is: {reason}' in result.stderr


@pytest.mark.skipif(not GLIBC, reason='glibc only')
def test_the_default_backend_is_found_without_starting_jax():
  # XLA's threads keep the malloc arena they take when the backends start,
  # so the settings must come first (JAX_PLATFORMS=cpu here).
  result = _run('''
      import json
      from jax._src import xla_bridge
      from reverse_sd.ops.cpu import tuning
      done = tuning.tune_process()
      print(json.dumps([done, xla_bridge.backends_are_initialized()]))
  ''')
  assert json.loads(result.stdout.splitlines()[-1]) == [SETTINGS, False]


@pytest.mark.skipif(not GLIBC, reason='glibc only')
@pytest.mark.parametrize('size_mb,thread', [(64, False), (96, True)])
def test_freed_blocks_are_reused_not_faulted_in_again(size_mb, thread):
  # A block allocated, written and freed 10 times: with glibc's defaults
  # each allocation is a fresh mmap whose pages fault in again. A thread
  # other than the main one (XLA's) gets its own arena, whose blocks over
  # 64 MB are always mmapped, unless there is one arena.
  code = '''
      import ctypes, resource, sys, threading
      from reverse_sd.ops.cpu import tuning
      tuning.tune_process('cpu')
      libc = ctypes.CDLL(None)
      libc.malloc.restype = ctypes.c_void_p
      libc.malloc.argtypes = (ctypes.c_size_t,)
      libc.free.argtypes = (ctypes.c_void_p,)
      def touch_and_free(size=int(sys.argv[1]) << 20):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
      def run():
        touch_and_free()  # Grows the heap once.
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
          touch_and_free()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      if sys.argv[2] == 'thread':
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
      else:
        run()
  '''

  def faults(**env):
    result = _run(code, str(size_mb), 'thread' if thread else 'main', **env)
    return int(result.stdout.split()[-1])

  pages = size_mb * 256  # 4 KB pages.
  assert faults() < 2000
  assert faults(REVERSE_SD_MALLOC_DEFAULTS='0') > 9 * pages
