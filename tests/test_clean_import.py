"""Importing reverse_sd changes nothing in the process (STYLE.md).

No module of the package may, on import, set an environment variable or a
JAX config value, call glibc's mallopt, change glibc's malloc thresholds or
start JAX's backends: entry points do process set-up in `main()`
(`reverse_sd.ops.cpu.tuning.tune_process`). The check runs in a fresh
process, so nothing a test did before can hide a change.
"""

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = textwrap.dedent('''
    import ctypes
    import importlib
    import json
    import os
    import pkgutil
    import sys

    # Every mallopt call from here on is recorded (and made).
    mallopt_calls = []

    class RecordingCDLL(ctypes.CDLL):

      def __getattr__(self, name):
        function = super().__getattr__(name)
        if name != 'mallopt':
          return function

        def mallopt(*args):
          mallopt_calls.append([repr(a) for a in args])
          return function(*args)
        return mallopt

    ctypes.CDLL = RecordingCDLL
    ctypes.cdll = ctypes.LibraryLoader(RecordingCDLL)

    # Third-party libraries first: what they do on import is theirs.
    # pylint: disable=g-import-not-at-top,unused-import
    import numpy
    import PIL.Image
    import tensorflow
    import jax
    import jax.numpy
    from jax._src import xla_bridge
    import flax
    import optax
    import orbax.checkpoint
    import clu.metrics
    import ml_collections
    import tensorflow_datasets
    import grain

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)

    class MallInfo2(ctypes.Structure):
      _fields_ = [(name, ctypes.c_size_t) for name in (
          'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
          'fsmblks', 'uordblks', 'fordblks', 'keepcost')]

    libc.mallinfo2.restype = MallInfo2

    def block_is_mmapped(size=64 << 20):
      """Whether glibc serves a 64 MB block with mmap: it does with its
      default thresholds (at most 32 MB), not with tune_process's."""
      before = libc.mallinfo2().hblkhd
      block = libc.malloc(size)
      mapped = libc.mallinfo2().hblkhd - before >= size
      libc.free(block)
      return mapped

    def jax_config():
      return {name: repr(value) for name, value in jax.config.values.items()}

    environ_before = dict(os.environ)
    config_before = jax_config()
    mmapped_before = block_is_mmapped()
    backends_before = xla_bridge.backends_are_initialized()

    import reverse_sd
    imported, skipped, failed = [], {}, {}

    def import_module(name):
      try:
        importlib.import_module(name)
        imported.append(name)
      except ModuleNotFoundError as e:
        if e.name and not e.name.startswith('reverse_sd'):
          skipped[name] = f'optional dependency {e.name} is not installed'
        else:
          failed[name] = f'{type(e).__name__}: {e}'
      except Exception as e:  # pylint: disable=broad-except
        failed[name] = f'{type(e).__name__}: {e}'

    for module in pkgutil.walk_packages(
        reverse_sd.__path__, 'reverse_sd.',
        onerror=lambda name: failed.setdefault(name, 'walk: import failed')):
      import_module(module.name)

    from reverse_sd.ops.cpu import tuning
    environ_after = dict(os.environ)
    config_after = jax_config()
    print(json.dumps(dict(
        imported=imported, skipped=skipped, failed=failed,
        environ={name: [environ_before.get(name), environ_after.get(name)]
                 for name in set(environ_before) | set(environ_after)
                 if environ_before.get(name) != environ_after.get(name)},
        jax_config={name: [config_before.get(name), config_after.get(name)]
                    for name in set(config_before) | set(config_after)
                    if config_before.get(name) != config_after.get(name)},
        mallopt_calls=mallopt_calls,
        mmapped=[mmapped_before, block_is_mmapped()],
        backends_started=[backends_before,
                          xla_bridge.backends_are_initialized()],
        tuning_applied=tuning.applied())))
''')


def _child_env() -> dict[str, str]:
  # glibc's defaults in the child: no malloc variables of the caller's.
  env = {name: value for name, value in os.environ.items()
         if not name.startswith('MALLOC_') and name != 'GLIBC_TUNABLES'}
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=REPO)
  return env


def test_importing_every_module_changes_nothing():
  result = subprocess.run([sys.executable, '-c', _CHILD], cwd=REPO,
                          env=_child_env(), capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, (
      f'the import check itself failed:\n{result.stderr[-4000:]}')
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for name, reason in sorted(report['skipped'].items()):
    print(f'skipped {name}: {reason}')
  problems = [f'{name} does not import: {error}'
              for name, error in sorted(report['failed'].items())]
  problems += [f'environment variable {name} changed: {before!r} -> '
               f'{after!r}'
               for name, (before, after) in sorted(report['environ'].items())]
  problems += [f'JAX config {name} changed: {before} -> {after}'
               for name, (before, after) in sorted(
                   report['jax_config'].items())]
  problems += [f'mallopt{tuple(args)} was called'
               for args in report['mallopt_calls']]
  if report['mmapped'] == [True, False]:
    problems.append('glibc no longer mmaps a 64 MB block: its malloc '
                    'thresholds were changed')
  if report['tuning_applied']:
    problems.append(f'tuning.tune_process ran: {report["tuning_applied"]}')
  if report['backends_started'] == [False, True]:
    problems.append('a module started JAX\'s backends (a computation at '
                    'import): tune_process must come before them')
  assert not problems, ('Importing reverse_sd changed the process (process '
                        'set-up belongs in main()):\n  ' +
                        '\n  '.join(problems))
  assert 'reverse_sd.ops.cpu.tuning' in report['imported']
  assert report['mmapped'][0], 'glibc mmaps 64 MB blocks by default'
