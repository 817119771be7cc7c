"""Process set-up for a CPU run: glibc keeps freed host memory for the next
step. Entry points call `tune_process()` in `main()`; importing changes
nothing.

XLA:CPU allocates a step's buffers (its temporaries as blocks of tens of
MB to GB) with the C allocator and frees them when the step ends. glibc
serves a block above its mmap threshold (128 KB, adapting up to 32 MB), and
any block over 64 MB asked for by a thread other than the main one, with a
fresh `mmap` and hands it back with `munmap`, so every step faults its
memory in again and the kernel zeroes it. On the 2-core machine of
`benchmarks/RESULTS.md` the default ConvNet's train step took 0.0616 s
without the settings below and 0.0467 s with them, 1.32x
(`benchmarks/ab_step.py`, 10 rounds, medians).

`tune_process()` sets, when the backend is XLA:CPU,
  * the mmap and trim thresholds to their maximum (2 GiB - 1), so freed
    blocks stay in the heap and the next step reuses them, and
  * one malloc arena (the main one, which can grow past 64 MB) for every
    thread; small blocks still come from each thread's own cache.
The process then keeps its peak heap instead of returning it between
steps. The settings must be made before JAX starts its backends: XLA's
threads take their own malloc arenas when they start, and keep them (a
jitted step of 64 MB products here: about 4,000 page faults per step with
the settings made first, 20,000 with them made after `jax.devices()`, as
many as without them).
So the default backend is found without starting JAX where it can be (see
`tune_process`). It changes nothing when

  * the backend is not 'cpu' (an accelerator's memory is XLA's own),
  * `REVERSE_SD_MALLOC_DEFAULTS=0`,
  * the user set any of these (`MALLOC_MMAP_THRESHOLD_`,
    `MALLOC_TRIM_THRESHOLD_`, `MALLOC_ARENA_MAX`, or `glibc.malloc.*` in
    `GLIBC_TUNABLES`): theirs win,
  * the C library is not glibc (macOS, musl) or has no `mallopt`.
"""

from collections.abc import MutableMapping
import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import pkgutil
import warnings

from absl import logging
import jax

DEFAULTS_ENV = 'REVERSE_SD_MALLOC_DEFAULTS'
# The largest value mallopt's int argument takes.
THRESHOLD = 2**31 - 1
# (mallopt(3) parameter name, its number, value, the environment variable
# that sets it at process start).
SETTINGS = (('M_MMAP_THRESHOLD', -3, THRESHOLD, 'MALLOC_MMAP_THRESHOLD_'),
            ('M_TRIM_THRESHOLD', -1, THRESHOLD, 'MALLOC_TRIM_THRESHOLD_'),
            ('M_ARENA_MAX', -8, 1, 'MALLOC_ARENA_MAX'))
GLIBC_ENV = tuple(env_name for *_, env_name in SETTINGS)
_ON = ('1', 'true', 'yes')
_OFF = ('0', 'false', 'no', '')

# What `tune_process` set in this process (mallopt name -> value).
_applied: dict[str, str] = {}


def applied() -> dict[str, str]:
  """The malloc settings `tune_process` made in this process ({}: none)."""
  return dict(_applied)


def skip_reason(environ: MutableMapping[str, str]) -> str | None:
  """Why `tune_process` leaves malloc as it is in `environ`, or None."""
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


def _set_malloc() -> tuple[dict[str, str], str | None]:
  """Applies `SETTINGS` with mallopt: (what it set, why not all or None)."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return {}, 'the C library has no mallopt'
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  done = {}
  for name, param, value, _ in SETTINGS:
    if mallopt(param, value) == 1:  # 1 on success, 0 on error.
      done[name] = str(value)
  failed = [name for name, *_ in SETTINGS if name not in done]
  return done, (f'mallopt refused {", ".join(failed)}' if failed else None)


def _accelerator_runtimes() -> list[str]:
  """The installed JAX plugins (CUDA, ROCm, ...) and libtpu, by name."""
  names = [entry.name for entry in
           importlib.metadata.entry_points(group='jax_plugins')]
  try:
    # Imported here: an optional namespace package, present only when an
    # accelerator plugin is installed.
    import jax_plugins  # pylint: disable=g-import-not-at-top
    names += [module.name for module in pkgutil.iter_modules(
        jax_plugins.__path__)]
  except ImportError:
    pass
  if importlib.util.find_spec('libtpu') is not None:
    names.append('libtpu')
  return names


def default_backend() -> str:
  """`jax.default_backend()`, without starting JAX's backends where the
  answer is known before: the first of JAX_PLATFORMS (`jax_platforms`) if
  set, else 'cpu' when no accelerator runtime is installed."""
  platforms = jax.config.jax_platforms
  if platforms:
    first = platforms.split(',')[0].strip()
    return {'cuda': 'gpu', 'rocm': 'gpu'}.get(first, first)
  if not _accelerator_runtimes():
    return 'cpu'
  return jax.default_backend()


def tune_process(backend: str | None = None) -> dict[str, str]:
  """Applies the CPU process settings of the module docstring.

  Call it once, at the start of an entry point's `main()` (after flags are
  parsed and `jax.distributed` is initialised), before anything starts
  JAX's backends: the settings are process-wide, and XLA's threads keep the
  malloc arenas they took before them.

  Args:
    backend: the JAX backend the process computes on; default
      `default_backend()` (`jax.default_backend()`, found without starting
      the backends when JAX_PLATFORMS is set or no accelerator runtime is
      installed).

  Returns:
    What it set, mallopt name -> value ({} when it set nothing).
  """
  backend = default_backend() if backend is None else backend
  if backend != 'cpu':
    logging.info('tune_process: malloc left as it is: the backend is %s.',
                 backend)
    return {}
  reason = skip_reason(os.environ)
  done = {}
  if not reason:
    done, reason = _set_malloc()
  _applied.update(done)
  if done:
    logging.info('tune_process: glibc malloc %s (%s=0 keeps glibc\'s '
                 'defaults).', ', '.join(f'{k}={v}' for k, v in done.items()),
                 DEFAULTS_ENV)
  if reason:
    logging.info('tune_process: malloc %s: %s.',
                 'partly set' if done else 'left as it is', reason)
  return done


def subprocess_env(environ: MutableMapping[str, str]) -> dict[str, str]:
  """The variables that give a child process (any program, e.g. a PyTorch
  baseline) the malloc settings `tune_process` makes on CPU; {} where it
  makes none."""
  if skip_reason(environ):
    return {}
  return {env_name: str(value) for _, _, value, env_name in SETTINGS}
