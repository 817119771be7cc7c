"""Opt-in XLA:CPU settings: oneDNN matrix products.

jaxlib 0.10's XLA:CPU runs dots through its own kernels (XNNPACK/YNNPACK or
Eigen) unless told otherwise; those run attention's batched products on one
thread. With oneDNN's kernels, ViT-B/16 inference ran at 3.59 against 2.38
img/s (separate runs) on the 2-core machine of `benchmarks/RESULTS.md`
("Opt-in, not default").

They are off by default: the flags are experimental in XLA, and with them
processes crashed (segmentation fault or abort) here: `tests/test_clip.py`
on 8 fake CPU devices in 3 of 6 runs; on one device, the white-box U-Net
smoke case of `benchmarks/train_step.py --quick` once, and once a
single jitted 6x5x4 batched matmul (in a test run of the suite).

`REVERSE_SD_XLA_CPU_ONEDNN=1` turns them on: importing `reverse_sd` then adds
the flags below to `XLA_FLAGS`, except
  * flags the variable already names (yours win), and
  * when the process asks for more than one CPU device
    (`--xla_force_host_platform_device_count=N` or `JAX_NUM_CPU_DEVICES=N`,
    N > 1), and
  * when the installed jaxlib is not a version the flags were checked with
    (`CHECKED_JAXLIB`): XLA exits on a flag it does not know.
XLA reads `XLA_FLAGS` when JAX starts its first backend, so this only takes
effect when `reverse_sd` is imported before any JAX computation. The flags
touch only the CPU backend.
"""

from collections.abc import MutableMapping
import importlib.metadata
import os

OPT_IN_ENV = 'REVERSE_SD_XLA_CPU_ONEDNN'
FAKE_DEVICES_FLAG = 'xla_force_host_platform_device_count'
# (flag, value): oneDNN thunks, used for every single dot (batched or not).
DEFAULT_FLAGS = (
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


def with_defaults(xla_flags: str) -> str:
  """`xla_flags` plus each default flag it does not name already."""
  named = _flag_values(xla_flags)
  added = [f'--{name}={value}' for name, value in DEFAULT_FLAGS
           if name not in named]
  return ' '.join([xla_flags.strip()] + added).strip()


def apply_defaults(environ: MutableMapping[str, str] | None = None,
                   version: tuple[int, int] | None = None) -> bool:
  """Adds `DEFAULT_FLAGS` to `environ['XLA_FLAGS']` if `environ` opts in
  (see the module doc).

  Args:
    environ: the environment to change (default `os.environ`).
    version: jaxlib's (major, minor) (default: the installed one).

  Returns:
    Whether the flags apply (False unless opted in, with several CPU
    devices, or with an unchecked jaxlib version); flags the variable
    already names are left as they are.
  """
  environ = os.environ if environ is None else environ
  if environ.get(OPT_IN_ENV, '0').strip().lower() not in ('1', 'true', 'yes'):
    return False
  if cpu_device_count(environ) > 1:
    return False
  version = jaxlib_version() if version is None else version
  if version not in CHECKED_JAXLIB:
    return False
  environ['XLA_FLAGS'] = with_defaults(environ.get('XLA_FLAGS', ''))
  return True
