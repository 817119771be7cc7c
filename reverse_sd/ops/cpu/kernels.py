"""Builds, loads and registers the op layer's XLA:CPU FFI kernels.

The kernels are C++ next to this file (`conv.cc`: the convolution with its
bias and ReLU, and its gradients; shared pieces in `kernels.h`). They are
compiled on first use with the system's C++ compiler (`$CXX`, else `g++` or
`c++` on PATH) against jaxlib's FFI headers into one shared library cached
under `$REVERSE_SD_KERNEL_CACHE` (default `~/.cache/reverse_sd/kernels`) and
keyed by the sources, the flags, the compiler and jaxlib's version, so an
edit or an upgrade rebuilds it. The build links in a temporary directory and
renames the library into place, so concurrent processes (test workers, hosts
sharing a home directory) never load a half-written one.

On x86-64 the library is compiled for AVX2 and FMA, and a CPU without them
gets XLA's own ops instead. Where the CPU also has AVX-512 (F, VL, DQ, BW),
it is compiled for that too (16-lane vectors, `VW` in `kernels.h`);
`REVERSE_SD_KERNEL_AVX512=0` keeps the AVX2 build.

Nothing here runs on GPU/TPU, and nothing is built at import time:
`reverse_sd.ops.conv.choose` asks `unavailable_reason()` once, when a model
is built for the CPU backend.
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib


CACHE_ENV = 'REVERSE_SD_KERNEL_CACHE'
# 0: build the 8-lane (AVX2) kernels even on a CPU with AVX-512.
AVX512_ENV = 'REVERSE_SD_KERNEL_AVX512'
AVX512_FEATURES = ('avx512f', 'avx512vl', 'avx512dq', 'avx512bw')
_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / 'conv.cc',)
HEADERS = (_HERE / 'kernels.h',)

# FFI target name -> exported handler symbol. On a mesh of several devices
# the callers run the targets inside `shard_map` (reverse_sd/ops/conv.py), so
# each sees its device's rows.
TARGETS = {
    'rsd_conv_kernel_grad': 'RsdConvKernelGrad',
    'rsd_conv_input_grad': 'RsdConvInputGrad',
    'rsd_conv_forward': 'RsdConvForward',
}


def _compile_flags() -> list[str]:
  flags = ['-O3', '-std=c++17', '-shared', '-fPIC', '-fno-math-errno',
           '-w']  # -w: jaxlib's headers warn.
  if _is_x86():
    flags += ['-mavx2', '-mfma']
    if _use_avx512():
      flags += [f'-m{f}' for f in AVX512_FEATURES]
  return flags


def _is_x86() -> bool:
  return platform.machine() in ('x86_64', 'AMD64')


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


# The CPU's feature flags (tests swap it).
_cpu_flags = cpu_flags


def _use_avx512() -> bool:
  """Whether to build the 16-lane kernels: the CPU has AVX-512 (F, VL, DQ,
  BW) and `$REVERSE_SD_KERNEL_AVX512` is not 0."""
  if os.environ.get(AVX512_ENV, '1') == '0':
    return False
  flags = _cpu_flags()
  return bool(flags) and all(f in flags for f in AVX512_FEATURES)


def _cpu_unsupported() -> str | None:
  """Why this CPU cannot run the library as compiled, or None."""
  if not _is_x86():
    return None
  flags = _cpu_flags()
  if flags is None:
    return 'cannot read /proc/cpuinfo to check for AVX2 and FMA'
  missing = [f for f in ('avx2', 'fma') if f not in flags]
  return f'the CPU lacks {", ".join(missing)}' if missing else None


def cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / '.cache' / 'reverse_sd' / 'kernels'
  return pathlib.Path(os.environ.get(CACHE_ENV) or default)


def _compiler() -> str:
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which(
      'c++')
  if not compiler:
    raise RuntimeError('no C++ compiler (g++ or c++ on PATH, or $CXX)')
  return compiler


def library_path(compiler: str) -> pathlib.Path:
  key = hashlib.sha256()
  for part in (*(p.read_bytes() for p in (*SOURCES, *HEADERS)),
               ' '.join(_compile_flags()).encode(), compiler.encode(),
               jaxlib.__version__.encode()):
    key.update(part)
  return cache_dir() / f'cpu_kernels-{key.hexdigest()[:16]}.so'


def _run_all(commands: list[list[str]]) -> None:
  """Runs the commands at once (one per source: the cores compile in
  parallel); raises naming the first that failed."""
  running = [(c, subprocess.Popen(c, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
             for c in commands]
  failed = None
  for command, process in running:
    try:
      _, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      process.kill()
      stderr = process.communicate()[1] + '\n(timed out after 600 s)'
    if process.returncode and failed is None:
      failed = RuntimeError(f'`{" ".join(command)}` failed:\n{stderr[-2000:]}')
  if failed:
    raise failed


def build() -> pathlib.Path:
  """Compiles the library into the cache unless it is there; its path."""
  compiler = _compiler()
  path = library_path(compiler)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as work:
    objects = [os.path.join(work, f'{source.stem}.o') for source in SOURCES]
    flags = _compile_flags()
    _run_all([[compiler, *flags, '-c', f'-I{jax.ffi.include_dir()}',
               str(source), '-o', obj]
              for source, obj in zip(SOURCES, objects)])
    library = os.path.join(work, path.name)
    _run_all([[compiler, *flags, *objects, '-o', library]])
    os.replace(library, path)  # Concurrent builders: the last one wins.
  return path


@functools.cache
def _load() -> str | None:
  """Builds and registers the library once; None, or why it cannot."""
  reason = _cpu_unsupported()
  if reason:
    return reason
  try:
    library = ctypes.CDLL(str(build()))
    handlers = {name: getattr(library, symbol)
                for name, symbol in TARGETS.items()}
  except (RuntimeError, OSError, AttributeError,
          subprocess.SubprocessError) as e:
    return f'the kernels did not build or load: {e}'
  for name, handler in handlers.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler),
                                platform='cpu')
  return None


@functools.cache
def warn_unavailable(kernel: str, fallback: str, reason: str) -> None:
  """Logs once per (kernel, reason) that `fallback` runs instead."""
  logging.warning('%s unavailable (%s); using %s.', kernel, reason, fallback)


def unavailable_reason() -> str | None:
  """None if the kernels can run in this process (built and registered for
  the CPU backend), else why not."""
  return _load()
