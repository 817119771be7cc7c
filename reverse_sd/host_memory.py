"""glibc malloc settings that keep freed host memory for the next step.

XLA:CPU allocates a step's buffers (its temporaries as blocks of tens of
MB) with the C allocator and frees them when the step ends. glibc serves a
block above its mmap threshold (128 KB, adapting up to 32 MB) with a fresh
`mmap` and hands it back with `munmap`, so every step faults its memory in
again and the kernel zeroes it: on the default ConvNet's train step on the
2-core machine of `benchmarks/RESULTS.md`, 12,500 page faults (50 MB) and
about 45 ms of system time per step of 140 ms (`benchmarks/train_step.py`
records the faults per step).

`apply_defaults()` (run when `reverse_sd` is imported) raises glibc's mmap
and trim thresholds to their maximum (2 GiB - 1), so freed blocks stay in
the heap and the next step reuses them: the process keeps its peak heap
instead of returning it between steps. It changes nothing when

  * `REVERSE_SD_MALLOC_DEFAULTS=0`,
  * the user set either threshold (`MALLOC_MMAP_THRESHOLD_`,
    `MALLOC_TRIM_THRESHOLD_`, or `glibc.malloc.mmap_threshold` /
    `glibc.malloc.trim_threshold` in `GLIBC_TUNABLES`): theirs win,
  * the C library is not glibc (macOS, musl) or has no `mallopt`.

Only the host allocator changes; accelerator memory is XLA's own.
"""

from collections.abc import MutableMapping
import ctypes
import os
import platform
import warnings

DEFAULTS_ENV = 'REVERSE_SD_MALLOC_DEFAULTS'
# mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest value mallopt's int argument takes.
THRESHOLD = 2**31 - 1
# The environment variables that set the thresholds at process start.
GLIBC_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')
_USER_TUNABLES = ('glibc.malloc.mmap_threshold', 'glibc.malloc.trim_threshold')
_ON = ('1', 'true', 'yes')
_OFF = ('0', 'false', 'no', '')


def skip_reason(environ: MutableMapping[str, str]) -> str | None:
  """Why `apply_defaults` leaves malloc as it is in `environ`, or None."""
  value = environ.get(DEFAULTS_ENV, '1').strip().lower()
  if value not in _ON + _OFF:
    warnings.warn(f'{DEFAULTS_ENV}={environ[DEFAULTS_ENV]!r} is not one of '
                  f'{_ON + _OFF}; using 1.', stacklevel=3)
    value = '1'
  if value in _OFF:
    return f'{DEFAULTS_ENV}={environ[DEFAULTS_ENV]}'
  for name in GLIBC_ENV:
    if name in environ:
      return f'{name} is set'
  tunables = environ.get('GLIBC_TUNABLES', '')
  for name in _USER_TUNABLES:
    if name in tunables:
      return f'GLIBC_TUNABLES sets {name}'
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return 'the C library is not glibc'
  return None


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
  """Raises glibc's mmap and trim thresholds (see the module docstring).

  Returns:
    Whether both thresholds were set.
  """
  environ = os.environ if environ is None else environ
  if skip_reason(environ):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  # mallopt returns 1 on success, 0 on error.
  return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD) and
              mallopt(M_TRIM_THRESHOLD, THRESHOLD))


def subprocess_env(environ: MutableMapping[str, str]) -> dict[str, str]:
  """The variables that give a child process (any program, e.g. a PyTorch
  baseline) the settings `apply_defaults` makes here; {} where it makes
  none."""
  if skip_reason(environ):
    return {}
  return {name: str(THRESHOLD) for name in GLIBC_ENV}
