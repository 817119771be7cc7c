"""Multi-head attention as one fused XLA:CPU kernel (an FFI call).

XLA:CPU runs `jax.nn.dot_product_attention` as separate ops: its batched
q k^T product runs the [Q, T] products of the (batch, head) pairs one after
another on one core, and the softmax is several passes over the logits. On
CLIP ViT-B/16 at 224 px that is about 2 s of a 10 s training step, for 4% of
the step's FLOPs (`benchmarks/RESULTS.md`). `cpu_attention.cc` computes each
(batch, head) pair's logits, softmax and products in one task, on XLA's
intra-op thread pool, and its gradient in the same way (recomputing the
probabilities from a saved log-sum-exp, as flash attention does).

The kernel is C++ built on first use (`cpu_kernels.py`).
`attention(..., impl='auto')` uses it for unmasked float32 attention on the
CPU backend when it builds and the CPU has the vector instructions it is
compiled for (x86-64: AVX2 and FMA); otherwise, and on
GPU/TPU (cuDNN, the TPU flash kernel), it is `jax.nn.dot_product_attention`.
`impl='cpu_kernel'` insists (and says why it cannot), `impl='xla'` never uses
the kernel. Both compute the same function; the tests compare values and
gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from reverse_sd.models import cpu_kernels

IMPLS = ('auto', 'xla', 'cpu_kernel')
_FORWARD = 'rsd_attention_forward'
_BACKWARD = 'rsd_attention_backward'


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
    unavailable = None if reason else cpu_kernels.unavailable_reason()
    if reason is None and unavailable is None:
      scale = 1.0 / float(np.sqrt(q_BxQxHxD.shape[-1]))
      return _fused(q_BxQxHxD, k_BxTxHxD, v_BxTxHxD, scale)
    if impl == 'cpu_kernel':
      raise ValueError("attention impl 'cpu_kernel' cannot run: "
                       f'{reason or unavailable}.')
    if unavailable and jax.default_backend() == 'cpu':
      cpu_kernels.warn_unavailable('Fused CPU attention',
                                   'jax.nn.dot_product_attention',
                                   unavailable)
  return jax.nn.dot_product_attention(q_BxQxHxD, k_BxTxHxD, v_BxTxHxD,
                                      mask=mask)
