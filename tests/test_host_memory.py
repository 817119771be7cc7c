"""glibc keeps freed blocks mapped (reverse_sd/host_memory.py)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from reverse_sd import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def test_skip_reasons():
  assert host_memory.skip_reason({}) is None or not GLIBC
  assert 'REVERSE_SD_MALLOC_DEFAULTS=0' in host_memory.skip_reason(
      {'REVERSE_SD_MALLOC_DEFAULTS': '0'})
  assert 'MALLOC_TRIM_THRESHOLD_ is set' in host_memory.skip_reason(
      {'MALLOC_TRIM_THRESHOLD_': '0'})
  assert 'glibc.malloc' in host_memory.skip_reason(
      {'GLIBC_TUNABLES': 'glibc.malloc.mmap_threshold=65536'})
  assert 'MALLOC_ARENA_MAX is set' in host_memory.skip_reason(
      {'MALLOC_ARENA_MAX': '4'})
  with pytest.warns(UserWarning, match='REVERSE_SD_MALLOC_DEFAULTS'):
    host_memory.skip_reason({'REVERSE_SD_MALLOC_DEFAULTS': 'maybe'})


def test_subprocess_env():
  assert host_memory.subprocess_env({'REVERSE_SD_MALLOC_DEFAULTS': '0'}) == {}
  if GLIBC:
    assert host_memory.subprocess_env({}) == {
        'MALLOC_MMAP_THRESHOLD_': str(2**31 - 1),
        'MALLOC_TRIM_THRESHOLD_': str(2**31 - 1), 'MALLOC_ARENA_MAX': '1'}


@pytest.mark.skipif(not GLIBC, reason='glibc only')
@pytest.mark.parametrize('size_mb,thread', [(64, False), (96, True)])
def test_freed_blocks_are_reused_not_faulted_in_again(size_mb, thread):
  # A block allocated, written and freed 10 times: with glibc's defaults
  # each allocation is a fresh mmap whose pages fault in again. A thread
  # other than the main one (XLA's) gets its own arena, whose blocks over
  # 64 MB are always mmapped, unless there is one arena.
  code = textwrap.dedent('''
      import ctypes, resource
      import reverse_sd
      libc = ctypes.CDLL(None)
      libc.malloc.restype = ctypes.c_void_p
      libc.free.argtypes = (ctypes.c_void_p,)
      import sys, threading
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
  ''')

  def faults(**env):
    result = subprocess.run(
        [sys.executable, '-c', code, str(size_mb),
         'thread' if thread else 'main'], cwd=REPO, capture_output=True,
        text=True, timeout=120, check=True,
        env=dict(os.environ, PYTHONPATH=REPO, **env))
    return int(result.stdout.split()[-1])

  pages = size_mb * 256  # 4 KB pages.
  assert faults() < 2000
  assert faults(REVERSE_SD_MALLOC_DEFAULTS='0') > 9 * pages
