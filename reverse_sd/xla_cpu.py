"""XLA:CPU settings: YNNPACK fusions off (default; its dots in the train
step on AVX-512 CPUs), oneDNN dots (opt-in).

jaxlib 0.10's XLA:CPU hands dots, convolutions and reductions to YNNPACK
("ynn_fusion" ops) unless told otherwise. On the 2-core AMD EPYC (AVX2) of
`benchmarks/RESULTS.md` its convolutions ran the default ConvNet's
inference at about 1200 img/s against about 2000 without them, and
ViT-B/16's step was 8% (training) and 15% (inference) slower with them
(`benchmarks/ab_step.py --change=ynn`). So importing `reverse_sd` turns
them off (`DEFAULT_FLAGS`): XLA then uses its own (Eigen) kernels, which
every jaxlib before YNNPACK used. On a CPU with AVX-512, in a one-device
process, the train step alone is compiled with YNNPACK for single dots
(`train_step_options`, used by `train.make_train_step`): on the 2-core
Xeon of the 2026-11-30 runs they ran the ConvNet's train step 6% faster
than Eigen's (its skinny read-out products) and ViT-B/16's the same, but
the predict steps 2% (ConvNet) and 9% (ViT-B/16) slower
(`benchmarks/ab_step.py --change=ynn_dots`, RESULTS.md).
`REVERSE_SD_XLA_CPU_DEFAULTS=0` keeps XLA's choice for both, and a
YNNPACK flag of your own in XLA_FLAGS is left to apply to both.

oneDNN's kernels for every dot (`ONEDNN_FLAGS`) are opt-in,
`REVERSE_SD_XLA_CPU_ONEDNN=1`: they ran ViT-B/16 inference faster still,
but the flags are experimental in XLA and with them processes crashed
(segmentation fault or abort) here: `tests/test_clip.py` on 8 fake CPU
devices in 3 of 6 runs; on one device, the white-box U-Net smoke case of
`benchmarks/train_step.py --quick` once, and once a single jitted 6x5x4
batched matmul (in a test run of the suite). They are never added when the
process asks for more than one CPU device
(`--xla_force_host_platform_device_count=N` or `JAX_NUM_CPU_DEVICES=N`,
N > 1).

Either set is added to `XLA_FLAGS` only
  * for flags the variable does not name already (yours win), and
  * when the installed jaxlib is a version the flags were checked with
    (`CHECKED_JAXLIB`): XLA exits on a flag it does not know.
XLA reads `XLA_FLAGS` when JAX starts its first backend, so this only takes
effect when `reverse_sd` is imported before any JAX computation. The flags
touch only the CPU backend.
"""

from collections.abc import MutableMapping
import functools
import importlib.metadata
import os
import warnings

DEFAULTS_ENV = 'REVERSE_SD_XLA_CPU_DEFAULTS'
OPT_IN_ENV = 'REVERSE_SD_XLA_CPU_ONEDNN'
FAKE_DEVICES_FLAG = 'xla_force_host_platform_device_count'
# (flag, value): no YNNPACK fusions (an empty list of fusion types).
YNN_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
DEFAULT_FLAGS = (
    (YNN_FLAG, ''),
)
# Compiler options of the train step (`train_step_options`): YNNPACK for
# single dots only.
TRAIN_STEP_OPTIONS = {YNN_FLAG: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
AVX512_FEATURES = ('avx512f', 'avx512vl', 'avx512dq', 'avx512bw')
# The flags `apply_defaults` added to XLA_FLAGS, comma-separated, so that a
# child process (which inherits both variables) tells them from the user's.
ADDED_ENV = 'REVERSE_SD_XLA_CPU_ADDED'
# The names this process's XLA_FLAGS held that `apply_defaults` did not add.
_user_flags: set[str] = set()
# (flag, value): oneDNN thunks, used for every single dot (batched or not).
ONEDNN_FLAGS = (
    ('xla_cpu_use_onednn', 'true'),
    ('xla_cpu_experimental_onednn_fusion_type', 'individual_dot'),
)
# jaxlib (major, minor) versions whose XLA has these flags.
CHECKED_JAXLIB = ((0, 10),)


def jaxlib_version() -> tuple[int, int] | None:
  """The installed jaxlib's (major, minor), or None if it is not installed."""
  try:
    version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return None
  try:
    major, minor = version.split('.')[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def _flag_values(xla_flags: str) -> dict[str, str]:
  values = {}
  for flag in xla_flags.split():
    name, _, value = flag.lstrip('-').partition('=')
    values[name] = value
  return values


def cpu_device_count(environ: MutableMapping[str, str]) -> int:
  """The CPU device count that `environ` asks JAX for (1 if it does not)."""
  counts = [_flag_values(environ.get('XLA_FLAGS', '')).get(FAKE_DEVICES_FLAG),
            environ.get('JAX_NUM_CPU_DEVICES')]
  try:
    return max([int(c) for c in counts if c not in (None, '')] or [1])
  except ValueError:
    return 1


def with_flags(xla_flags: str, flags) -> str:
  """`xla_flags` plus each (name, value) of `flags` it does not name."""
  named = _flag_values(xla_flags)
  added = [f'--{name}={value}' for name, value in flags if name not in named]
  return ' '.join([xla_flags.strip()] + added).strip()


_ON = ('1', 'true', 'yes')
_OFF = ('0', 'false', 'no', '')


def _is_set(environ: MutableMapping[str, str], name: str,
            default: str) -> bool:
  """Whether `environ[name]` says on; a value that is neither on nor off
  warns (naming the variable) and counts as `default`."""
  value = environ.get(name, default).strip().lower()
  if value not in _ON + _OFF:
    warnings.warn(f'{name}={environ[name]!r} is not one of {_ON + _OFF}; '
                  f'using {default!r}.', stacklevel=3)
    value = default
  return value in _ON


@functools.cache
def cpu_flags() -> frozenset[str] | None:
  """The CPU's feature flags from /proc/cpuinfo (empty if it lists none),
  or None if it cannot be read (as on non-Linux hosts)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('flags'):
          return frozenset(line.split(':', 1)[1].split())
  except OSError:
    return None
  return frozenset()


def cpu_has_avx512() -> bool:
  """Whether /proc/cpuinfo lists AVX-512 F, VL, DQ and BW."""
  flags = cpu_flags() or frozenset()
  return all(feature in flags for feature in AVX512_FEATURES)


def train_step_options(environ: MutableMapping[str, str] | None = None,
                       avx512: bool | None = None,
                       device_count: int | None = None,
                       backend: str | None = None,
                       version: tuple[int, int] | None = None
                       ) -> dict[str, str]:
  """XLA compiler options for the train step's jit (see the module doc).

  `TRAIN_STEP_OPTIONS` on a one-device CPU backend whose CPU has AVX-512,
  with the defaults on (`REVERSE_SD_XLA_CPU_DEFAULTS`), a checked jaxlib
  and no YNNPACK flag of the user's in XLA_FLAGS; else {}. The arguments
  default to this process's.
  """
  environ = os.environ if environ is None else environ
  version = jaxlib_version() if version is None else version
  if (version not in CHECKED_JAXLIB or YNN_FLAG in _user_flags or
      not _is_set(environ, DEFAULTS_ENV, '1')):
    return {}
  if backend is None or device_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    backend = jax.default_backend() if backend is None else backend
    device_count = jax.device_count() if device_count is None else (
        device_count)
  avx512 = cpu_has_avx512() if avx512 is None else avx512
  if backend != 'cpu' or device_count != 1 or not avx512:
    return {}
  return dict(TRAIN_STEP_OPTIONS)


def flags_for(environ: MutableMapping[str, str],
              version: tuple[int, int] | None = None
              ) -> tuple[tuple[str, str], ...]:
  """The (flag, value) pairs `environ` asks for (see the module doc)."""
  version = jaxlib_version() if version is None else version
  if version not in CHECKED_JAXLIB:
    return ()
  flags = DEFAULT_FLAGS if _is_set(environ, DEFAULTS_ENV, '1') else ()
  if _is_set(environ, OPT_IN_ENV, '0') and cpu_device_count(environ) <= 1:
    flags += ONEDNN_FLAGS
  return flags


def apply_defaults(environ: MutableMapping[str, str] | None = None,
                   version: tuple[int, int] | None = None
                   ) -> tuple[str, ...]:
  """Adds the flags of `flags_for` to `environ['XLA_FLAGS']`.

  Args:
    environ: the environment to change (default `os.environ`).
    version: jaxlib's (major, minor) (default: the installed one).

  Returns:
    The names of the flags that apply (empty with an unchecked jaxlib, or
    with both sets off); flags the variable already names are left as they
    are.
  """
  environ = os.environ if environ is None else environ
  ours = set(filter(None, environ.get(ADDED_ENV, '').split(',')))
  if environ is os.environ:
    _user_flags.update(
        set(_flag_values(environ.get('XLA_FLAGS', ''))) - ours)
  flags = flags_for(environ, version)
  if flags:
    named = _flag_values(environ.get('XLA_FLAGS', ''))
    environ['XLA_FLAGS'] = with_flags(environ.get('XLA_FLAGS', ''), flags)
    environ[ADDED_ENV] = ','.join(sorted(
        ours | {name for name, _ in flags if name not in named}))
  return tuple(name for name, _ in flags)
