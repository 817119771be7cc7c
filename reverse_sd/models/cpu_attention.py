"""Multi-head attention as one fused XLA:CPU kernel (an FFI call).

XLA:CPU runs `jax.nn.dot_product_attention` as separate ops: its batched
q k^T product runs the [Q, T] products of the (batch, head) pairs one after
another on one core, and the softmax is several passes over the logits. On
CLIP ViT-B/16 at 224 px that is about 2 s of a 10 s training step, for 4% of
the step's FLOPs (`benchmarks/RESULTS.md`). `cpu_attention.cc` computes each
(batch, head) pair's logits, softmax and products in one task, on XLA's
intra-op thread pool, and its gradient in the same way (recomputing the
probabilities from a saved log-sum-exp, as flash attention does).

The kernel is C++ built on first use with the system's C++ compiler against
jaxlib's FFI headers, cached under `$REVERSE_SD_KERNEL_CACHE` (default
`~/.cache/reverse_sd/kernels`), keyed by the source, the flags and jaxlib's
version. `attention(..., impl='auto')` uses it for unmasked float32
attention on the CPU backend when it builds and the CPU has the vector
instructions it is compiled for (x86-64: AVX2 and FMA); otherwise, and on
GPU/TPU (cuDNN, the TPU flash kernel), it is `jax.nn.dot_product_attention`.
`impl='cpu_kernel'` insists (and says why it cannot), `impl='xla'` never uses
the kernel. Both compute the same function; the tests compare values and
gradients.
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
import jax.numpy as jnp
import jaxlib
import numpy as np

IMPLS = ('auto', 'xla', 'cpu_kernel')
CACHE_ENV = 'REVERSE_SD_KERNEL_CACHE'
SOURCE = pathlib.Path(__file__).with_name('cpu_attention.cc')
_FORWARD = 'rsd_attention_forward'
_BACKWARD = 'rsd_attention_backward'


def _compile_flags() -> list[str]:
  flags = ['-O3', '-std=c++17', '-shared', '-fPIC', '-fno-math-errno',
           '-w']  # -w: jaxlib's headers warn.
  if platform.machine() in ('x86_64', 'AMD64'):
    flags += ['-mavx2', '-mfma']
  return flags


def _cpu_unsupported() -> str | None:
  """Why this CPU cannot run the kernel as compiled, or None."""
  if platform.machine() not in ('x86_64', 'AMD64'):
    return None
  try:
    text = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return 'cannot read /proc/cpuinfo to check for AVX2 and FMA'
  flags = set()
  for line in text.splitlines():
    if line.startswith('flags'):
      flags = set(line.split(':', 1)[1].split())
      break
  missing = [f for f in ('avx2', 'fma') if f not in flags]
  return f'the CPU lacks {", ".join(missing)}' if missing else None


def cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / '.cache' / 'reverse_sd' / 'kernels'
  return pathlib.Path(os.environ.get(CACHE_ENV) or default)


def _library_path(compiler: str) -> pathlib.Path:
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), ' '.join(_compile_flags()).encode(),
               compiler.encode(), jaxlib.__version__.encode()):
    key.update(part)
  return cache_dir() / f'cpu_attention-{key.hexdigest()[:16]}.so'


def _build() -> pathlib.Path:
  """Compiles the kernel into the cache (atomically); returns its path."""
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which(
      'c++')
  if not compiler:
    raise RuntimeError('no C++ compiler (g++ or c++ on PATH, or $CXX)')
  path = _library_path(compiler)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=path.parent)
  os.close(fd)
  command = [compiler, *_compile_flags(), f'-I{jax.ffi.include_dir()}',
             str(SOURCE), '-o', tmp]
  try:
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=300, check=False)
    if result.returncode:
      raise RuntimeError(f'`{" ".join(command)}` failed:\n'
                         f'{result.stderr[-2000:]}')
    os.replace(tmp, path)  # Concurrent builders: the last one wins, intact.
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


@functools.cache
def _load() -> str | None:
  """Builds and registers the kernel once; None, or why it is unavailable."""
  reason = _cpu_unsupported()
  if reason:
    return reason
  try:
    library = ctypes.CDLL(str(_build()))
    forward, backward = (library.RsdAttentionForward,
                         library.RsdAttentionBackward)
  except (RuntimeError, OSError, AttributeError,
          subprocess.SubprocessError) as e:
    return f'the kernel did not build or load: {e}'
  jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(forward),
                              platform='cpu')
  jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(backward),
                              platform='cpu')
  # Data parallelism: the SPMD partitioner splits the calls along the
  # leading (batch) axis of every operand and result.
  jax.ffi.register_ffi_target_as_batch_partitionable(_FORWARD)
  jax.ffi.register_ffi_target_as_batch_partitionable(_BACKWARD)
  return None


def unavailable_reason() -> str | None:
  """None if the kernel can run in this process, else why not."""
  if jax.default_backend() != 'cpu':
    return f'the default backend is {jax.default_backend()}, not cpu'
  return _load()


@functools.cache
def _warn_once(reason: str) -> None:
  logging.warning('Fused CPU attention unavailable (%s); using '
                  'jax.nn.dot_product_attention.', reason)


def _forward_call(q, k, v, scale):
  batch, queries, heads, _ = q.shape
  return jax.ffi.ffi_call(
      _FORWARD,
      (jax.ShapeDtypeStruct(q.shape, jnp.float32),
       jax.ShapeDtypeStruct((batch, heads, queries), jnp.float32)),
      vmap_method='sequential')(q, k, v, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(q, k, v, scale):
  return _forward_call(q, k, v, scale)[0]


def _fused_fwd(q, k, v, scale):
  out, lse = _forward_call(q, k, v, scale)
  return out, (q, k, v, out, lse)


def _fused_bwd(scale, residuals, dout):
  q, k, v, out, lse = residuals
  return tuple(jax.ffi.ffi_call(
      _BACKWARD,
      (jax.ShapeDtypeStruct(q.shape, jnp.float32),
       jax.ShapeDtypeStruct(k.shape, jnp.float32),
       jax.ShapeDtypeStruct(v.shape, jnp.float32)),
      vmap_method='sequential')(q, k, v, out, lse,
                                dout.astype(jnp.float32),
                                scale=np.float32(scale)))


_fused.defvjp(_fused_fwd, _fused_bwd)


def _kernel_unsupported(q, k, v, mask) -> str | None:
  """Why these inputs cannot use the kernel (None: they can)."""
  if mask is not None:
    return 'a mask'
  if any(x.dtype != jnp.float32 for x in (q, k, v)):
    return f'dtype {q.dtype} (the kernel is float32)'
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    return f'shapes q {q.shape}, k {k.shape}, v {v.shape}'
  return None


def attention(q_BxQxHxD, k_BxTxHxD, v_BxTxHxD, mask=None,
              impl: str = 'auto'):
  """softmax(q k^T / sqrt(D)) v, as `jax.nn.dot_product_attention`.

  Args:
    q_BxQxHxD: queries.
    k_BxTxHxD: keys.
    v_BxTxHxD: values.
    mask: optional boolean mask broadcastable to [B, H, Q, T] (True: may
      attend). Masked attention always runs as `jax.nn.dot_product_attention`.
    impl: 'auto' (the fused CPU kernel where it applies, see the module
      docstring), 'xla' (`jax.nn.dot_product_attention`) or 'cpu_kernel'
      (the fused kernel, or an error saying why it cannot run).

  Returns:
    [B, Q, H, D].
  """
  if impl not in IMPLS:
    raise ValueError(f'attention impl {impl!r}: expected one of {IMPLS}.')
  if impl != 'xla':
    reason = _kernel_unsupported(q_BxQxHxD, k_BxTxHxD, v_BxTxHxD, mask)
    unavailable = None if reason else unavailable_reason()
    if reason is None and unavailable is None:
      scale = 1.0 / float(np.sqrt(q_BxQxHxD.shape[-1]))
      return _fused(q_BxQxHxD, k_BxTxHxD, v_BxTxHxD, scale)
    if impl == 'cpu_kernel':
      raise ValueError("attention impl 'cpu_kernel' cannot run: "
                       f'{reason or unavailable}.')
    if unavailable and jax.default_backend() == 'cpu':
      _warn_once(unavailable)
  return jax.nn.dot_product_attention(q_BxQxHxD, k_BxTxHxD, v_BxTxHxD,
                                      mask=mask)
