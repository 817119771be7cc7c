"""LayerNorm whose CPU forward and gradient are one fused kernel each.

XLA:CPU computes `flax.linen.LayerNorm`'s gradient as several passes over the
activations and its parameter gradients (sums over every row) as split
column reductions: on CLIP ViT-B/16's [8, 197, 768] activations the
gradient takes about ten times the forward. `cpu_layer_norm.cc` reads each
row once per pass while it is in L1, and each thread sums its rows'
parameter gradients into its own buffer (`benchmarks/RESULTS.md`).

`LayerNorm` is `flax.linen.LayerNorm` (same fields, parameters and
initialisers, so checkpoints and converters are unchanged) with one more
field, `impl`:
  'auto'        the kernel for float32 normalisation over the last axis on
                the CPU backend in a one-device process, when the kernels
                build (`cpu_kernels.py`); `flax.linen.LayerNorm` otherwise.
                The kernel's parameter gradient is a sum over the batch, which
                the SPMD partitioner would gather on a sharded batch, so
                several devices keep XLA's ops (as `conv.py`'s 'auto' does).
  'xla'         always `flax.linen.LayerNorm`.
  'cpu_kernel'  the kernel, or an error saying why it cannot run.
The kernel computes the variance in two passes (flax: E[x^2] - E[x]^2), so the
two differ by rounding; the tests compare values and gradients.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reverse_sd.models import cpu_kernels

IMPLS = ('auto', 'xla', 'cpu_kernel')
_FORWARD = 'rsd_layer_norm_forward'
_BACKWARD = 'rsd_layer_norm_backward'


def _forward_call(x, scale, bias, eps):
  stats = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
  return jax.ffi.ffi_call(
      _FORWARD, (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats),
      vmap_method='sequential')(x, scale, bias, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
  """(x - mean) / sqrt(var + eps) * scale + bias over x's last axis, fused.

  float32 on the CPU backend only (see the module docstring); x [..., D],
  scale and bias [D].
  """
  return _forward_call(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  y, mean, rstd = _forward_call(x, scale, bias, eps)
  return y, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, residuals, dy):
  del eps
  x, scale, mean, rstd = residuals
  return tuple(jax.ffi.ffi_call(
      _BACKWARD,
      (jax.ShapeDtypeStruct(x.shape, jnp.float32),
       jax.ShapeDtypeStruct(scale.shape, jnp.float32),
       jax.ShapeDtypeStruct(scale.shape, jnp.float32)),
      vmap_method='sequential')(x, scale, mean, rstd,
                                dy.astype(jnp.float32)))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.LayerNorm):
  """`flax.linen.LayerNorm` with a fused CPU kernel; see the module doc.

  Attributes:
    impl: 'auto', 'xla' or 'cpu_kernel' (`IMPLS`).
  """
  impl: str = 'auto'

  def _unsupported(self, x, mask) -> str | None:
    """Why this call cannot use the kernel (None: it can)."""
    if mask is not None:
      return 'a mask'
    if x.dtype != jnp.float32 or jnp.dtype(self.dtype or x.dtype) != (
        jnp.float32) or jnp.dtype(self.param_dtype) != jnp.float32:
      return (f'dtype {x.dtype} / {self.dtype} / {self.param_dtype} (the '
              'kernel is float32)')
    for field in ('reduction_axes', 'feature_axes'):
      axes = getattr(self, field)
      axes = (axes,) if isinstance(axes, int) else tuple(axes)
      if len(axes) != 1 or axes[0] % x.ndim != x.ndim - 1:
        return f'{field}={getattr(self, field)} (the kernel: the last axis)'
    if not (self.use_bias and self.use_scale):
      return 'use_bias=False or use_scale=False'
    if self.axis_name is not None:
      return f'axis_name={self.axis_name!r}'
    return None

  @nn.compact
  def __call__(self, x, *, mask=None):
    if self.impl not in IMPLS:
      raise ValueError(f'LayerNorm impl {self.impl!r}: expected one of '
                       f'{IMPLS}.')
    if self.impl != 'xla':
      reason = self._unsupported(x, mask)
      if reason is None and self.impl == 'auto' and jax.device_count() > 1:
        reason = (f'{jax.device_count()} devices (the parameter gradient '
                  'would gather the batch)')
      unavailable = None if reason else cpu_kernels.unavailable_reason()
      if reason is None and unavailable is None:
        features = x.shape[-1]
        scale = self.param('scale', self.scale_init, (features,),
                           self.param_dtype)
        bias = self.param('bias', self.bias_init, (features,),
                          self.param_dtype)
        return layer_norm(x, scale, bias, float(self.epsilon))
      if self.impl == 'cpu_kernel':
        raise ValueError("LayerNorm impl 'cpu_kernel' cannot run: "
                         f'{reason or unavailable}.')
      if unavailable and jax.default_backend() == 'cpu':
        cpu_kernels.warn_unavailable('Fused CPU LayerNorm',
                                     'flax.linen.LayerNorm', unavailable)
    return super().__call__(x, mask=mask)
