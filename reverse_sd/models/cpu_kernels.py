"""Builds, loads and registers the project's XLA:CPU FFI kernels.

The kernels are C++ next to this file (`cpu_attention.cc`: fused attention
and its gradient; `cpu_conv.cc`: the convolution with its bias and ReLU, and its
gradients;
`cpu_layer_norm.cc`: LayerNorm and its gradient; `cpu_sum_squares.cc`: the
gradient's global norm; shared pieces in `cpu_kernels.h`). They are
compiled on first use with the system's C++ compiler (`$CXX`, else `g++` or
`c++` on PATH) against jaxlib's FFI headers, one source per process in
parallel, into one shared library cached under `$REVERSE_SD_KERNEL_CACHE`
(default `~/.cache/reverse_sd/kernels`) and keyed by the sources, the
flags, the compiler and jaxlib's version, so an edit or an upgrade rebuilds
it. The build links in a temporary directory and renames the library into
place, so concurrent processes (test workers, hosts sharing a home
directory) never load a half-written one.

On x86-64 the library is compiled for AVX2 and FMA (every x86 server CPU of
the last ten years), and a CPU without them gets XLA's own ops instead.
Where the CPU also has AVX-512 (F, VL, DQ, BW), it is compiled for that
too, and the code written for the widest vector (`VW`, `kLanes` in
`cpu_kernels.h`: the convolution's forward pass and kernel-gradient tiles,
the shared matrix product, attention's softmax and row passes, LayerNorm)
uses 16 lanes;
`REVERSE_SD_KERNEL_AVX512=0` keeps the AVX2 build. The flags are part of
the cache key, so machines of different CPUs sharing a home directory each
build their own.
Nothing here runs on GPU/TPU: the callers check `unavailable_reason()` and
keep XLA's ops (cuDNN, the TPU kernels) there.
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

from reverse_sd import xla_cpu

CACHE_ENV = 'REVERSE_SD_KERNEL_CACHE'
# 0: build the 8-lane (AVX2) kernels even on a CPU with AVX-512.
AVX512_ENV = 'REVERSE_SD_KERNEL_AVX512'
AVX512_FEATURES = xla_cpu.AVX512_FEATURES
_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / 'cpu_attention.cc', _HERE / 'cpu_conv.cc',
           _HERE / 'cpu_layer_norm.cc', _HERE / 'cpu_sum_squares.cc')
HEADERS = (_HERE / 'cpu_kernels.h',)

# FFI target name -> (exported handler symbol, batch partitionable). A batch
# partitionable target is split by the SPMD partitioner along the leading
# axis of every operand and result (data parallelism); the others (the
# kernel gradient, a sum over the batch) see whole arrays.
TARGETS = {
    'rsd_attention_forward': ('RsdAttentionForward', True),
    'rsd_attention_backward': ('RsdAttentionBackward', True),
    'rsd_conv_kernel_grad': ('RsdConvKernelGrad', False),
    'rsd_conv_input_grad': ('RsdConvInputGrad', True),
    'rsd_conv_forward': ('RsdConvForward', True),
    'rsd_layer_norm_forward': ('RsdLayerNormForward', False),
    'rsd_layer_norm_backward': ('RsdLayerNormBackward', False),
    'rsd_sum_squares': ('RsdSumSquares', False),
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


# The CPU's feature flags (one reader for the package; tests swap it).
_cpu_flags = xla_cpu.cpu_flags


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
                for name, (symbol, _) in TARGETS.items()}
  except (RuntimeError, OSError, AttributeError,
          subprocess.SubprocessError) as e:
    return f'the kernels did not build or load: {e}'
  for name, handler in handlers.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler),
                                platform='cpu')
    if TARGETS[name][1]:
      jax.ffi.register_ffi_target_as_batch_partitionable(name)
  return None


@functools.cache
def warn_unavailable(kernel: str, fallback: str, reason: str) -> None:
  """Logs once per (kernel, reason) that `fallback` runs instead."""
  logging.warning('%s unavailable (%s); using %s.', kernel, reason, fallback)


def unavailable_reason() -> str | None:
  """None if the kernels can run in this process, else why not."""
  if jax.default_backend() != 'cpu':
    return f'the default backend is {jax.default_backend()}, not cpu'
  return _load()
