"""glibc malloc settings that keep freed host memory for the next step.

XLA:CPU allocates a step's buffers (its temporaries as blocks of tens of
MB to GB) with the C allocator and frees them when the step ends. glibc
serves a block above its mmap threshold (128 KB, adapting up to 32 MB), and
any block over 64 MB asked for by a thread other than the main one, with a
fresh `mmap` and hands it back with `munmap`, so every step faults its
memory in again and the kernel zeroes it. On the 2-core machine of
`benchmarks/RESULTS.md` (`benchmarks/train_step.py` records the faults and
system time per step): 12,500 page faults (50 MB) and 41 ms of system time
per 130 ms step of the default ConvNet, and 291,000 faults per step of CLIP
ViT-B/16 (its 1.1 GB of XLA temporaries).

`apply_defaults()` (run when `reverse_sd` is imported) sets
  * the mmap and trim thresholds to their maximum (2 GiB - 1), so freed
    blocks stay in the heap and the next step reuses them, and
  * one malloc arena (the main one, which can grow past 64 MB) for every
    thread; small blocks still come from each thread's own cache.
The process then keeps its peak heap instead of returning it between
steps. It changes nothing when

  * `REVERSE_SD_MALLOC_DEFAULTS=0`,
  * the user set any of these (`MALLOC_MMAP_THRESHOLD_`,
    `MALLOC_TRIM_THRESHOLD_`, `MALLOC_ARENA_MAX`, or `glibc.malloc.*` in
    `GLIBC_TUNABLES`): theirs win,
  * the C library is not glibc (macOS, musl) or has no `mallopt`.

Only the host allocator changes; accelerator memory is XLA's own.
"""

from collections.abc import MutableMapping
import ctypes
import os
import platform
import warnings

DEFAULTS_ENV = 'REVERSE_SD_MALLOC_DEFAULTS'
# The largest value mallopt's int argument takes.
THRESHOLD = 2**31 - 1
# (mallopt(3) parameter, value, the environment variable that sets it at
# process start).
SETTINGS = ((-3, THRESHOLD, 'MALLOC_MMAP_THRESHOLD_'),  # M_MMAP_THRESHOLD
            (-1, THRESHOLD, 'MALLOC_TRIM_THRESHOLD_'),  # M_TRIM_THRESHOLD
            (-8, 1, 'MALLOC_ARENA_MAX'))  # M_ARENA_MAX
GLIBC_ENV = tuple(name for _, _, name in SETTINGS)
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
  if 'glibc.malloc.' in environ.get('GLIBC_TUNABLES', ''):
    return 'GLIBC_TUNABLES sets glibc.malloc.*'
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return 'the C library is not glibc'
  return None


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
  """Applies `SETTINGS` to glibc's malloc (see the module docstring).

  Returns:
    Whether every setting was applied.
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
  return all([mallopt(param, value) == 1 for param, value, _ in SETTINGS])


def subprocess_env(environ: MutableMapping[str, str]) -> dict[str, str]:
  """The variables that give a child process (any program, e.g. a PyTorch
  baseline) the settings `apply_defaults` makes here; {} where it makes
  none."""
  if skip_reason(environ):
    return {}
  return {name: str(value) for _, value, name in SETTINGS}
