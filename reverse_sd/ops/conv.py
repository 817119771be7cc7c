"""2-D convolution with its bias and activation: XLA's, or a CPU kernel.

    y = activation(conv2d(x, kernel) + bias)      NHWC x HWIO -> NHWC

Implementations (`IMPLEMENTATIONS`):

  'xla'         `lax.conv_general_dilated`, the bias add and the activation,
                differentiated by JAX: the reference, and the path on GPU
                (cuDNN) and TPU.
  'cpu_kernel'  XLA:CPU FFI calls (`cpu/conv.cc`, built on first use by
                `cpu/kernels.py`): the forward pass with its bias and ReLU in
                one pass (kernels up to `FORWARD_KERNEL_MAX_BYTES`; larger
                ones keep XLA's forward pass) and both gradients reading the
                input and the output gradient in place. float32 only.

Why the CPU kernel stays: on the default job's ConvNet train step it ran
1.53x faster than 'xla' in an interleaved A/B on the 2-core Xeon
(benchmarks/RESULTS.md, `benchmarks/ab_step.py --change=conv`).

The choice is made once, when a model is built: `choose(name, platform,
mesh)` from `config.model.conv` ('auto' or a name) and the backend. 'auto'
is 'cpu_kernel' on the CPU backend when the kernels build (else 'xla', with
a warning that says why), 'xla' elsewhere; `--config.model.conv=xla` turns
the CPU kernels off. On a mesh of several devices the kernel runs inside
`jax.shard_map` over the batch axes, its kernel and bias gradients summed
over them with `psum`, so one config runs the same code on 1 and on 8
devices.

`Conv` is `flax.linen.Conv` for NHWC inputs and 2-D kernels (same parameter
names, shapes and initialisers, so checkpoints and converters do not
change), with no dilation and no feature groups.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import logging
import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np

from reverse_sd.ops import platform as ops_platform
from reverse_sd.ops.cpu import kernels as cpu_kernels

XLA = 'xla'
CPU_KERNEL = 'cpu_kernel'
IMPLEMENTATIONS = (XLA, CPU_KERNEL)
AUTO = 'auto'
CHOICES = (AUTO,) + IMPLEMENTATIONS
ACTIVATIONS = (None, 'relu')
BATCH_AXES = ('data', 'fsdp')
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
# The FFI forward pass reads its kernel's slice for every tile of 12 output
# pixels from cache: above this size (about half of a 2 MB L2 cache) it ran
# slower than XLA's convolution (a 3x3 convolution of 320 to 320 channels,
# 3.7 MB: about half XLA's speed), so larger kernels keep XLA's forward pass,
# with the bias and activation after it.
FORWARD_KERNEL_MAX_BYTES = 1536 << 10

Padding = str | Sequence[tuple[int, int]]


def explicit_padding(padding: Padding, in_hw: Sequence[int],
                     kernel_hw: Sequence[int],
                     strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """'SAME' / 'VALID' / ((lo, hi), (lo, hi)) -> explicit (lo, hi) pairs.

  'SAME' follows XLA (and TensorFlow): out = ceil(in / stride), the odd pixel
  of padding goes after.
  """
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == 'VALID':
      return tuple((0, 0) for _ in in_hw)
    if mode != 'SAME':
      raise ValueError(f"Conv padding {padding!r}: expected 'SAME', 'VALID' "
                       'or ((lo, hi), (lo, hi)).')
    pads = []
    for size, k, s in zip(in_hw, kernel_hw, strides):
      out = -(-size // s)
      total = max((out - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    return tuple(pads)
  pads = tuple(tuple(int(p) for p in pair) for pair in padding)
  if len(pads) != len(in_hw) or any(len(p) != 2 for p in pads):
    raise ValueError(f'Conv padding {padding!r}: expected one (lo, hi) pair '
                     f'per spatial dimension ({len(in_hw)}).')
  return pads


def reference(x_BxHxWxC, kernel_HxWxIxO, bias_O=None, strides=(1, 1),
              padding: Padding = 'SAME', activation: str | None = None):
  """The op in plain JAX ('xla')."""
  strides = tuple(int(s) for s in strides)
  pads = explicit_padding(padding, x_BxHxWxC.shape[1:3],
                          kernel_HxWxIxO.shape[:2], strides)
  y = lax.conv_general_dilated(x_BxHxWxC, kernel_HxWxIxO, strides, pads,
                               dimension_numbers=_DIMENSION_NUMBERS)
  if bias_O is not None:
    y = y + bias_O.astype(y.dtype)
  return jax.nn.relu(y) if activation == 'relu' else y


# --- The CPU kernel -----------------------------------------------------------


def _ffi_attrs(strides, padding):
  (pt, _), (pl, _) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(pt), pad_left=np.int64(pl))


def _output_shape(x_shape, kernel_shape, strides, padding):
  n, h, w, _ = x_shape
  kh, kw, _, out_channels = kernel_shape
  (pt, pb), (pl, pr) = padding
  return (n, (h + pt + pb - kh) // strides[0] + 1,
          (w + pl + pr - kw) // strides[1] + 1, out_channels)


def _ffi_forward(x, kernel, bias, strides, padding, activation, fused):
  """The forward pass on one device's rows: one FFI call when `fused`, else
  XLA's convolution with the bias and activation after it."""
  if not fused:
    y = lax.conv_general_dilated(x, kernel, strides, padding,
                                 dimension_numbers=_DIMENSION_NUMBERS) + bias
    return jax.nn.relu(y) if activation == 'relu' else y
  out = jax.ShapeDtypeStruct(
      _output_shape(x.shape, kernel.shape, strides, padding), jnp.float32)
  return jax.ffi.ffi_call('rsd_conv_forward', out, vmap_method='sequential')(
      x, kernel, bias, **_ffi_attrs(strides, padding),
      relu=np.int64(activation == 'relu'))


def _ffi_grads(x, kernel, dz, strides, padding, batch_axes):
  """(dx, dkernel, dbias) on one device's rows, the parameter gradients
  summed over `batch_axes`."""
  attrs = _ffi_attrs(strides, padding)
  dkernel = jax.ffi.ffi_call(
      'rsd_conv_kernel_grad',
      jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
      vmap_method='sequential')(x, dz, **attrs)
  dx = jax.ffi.ffi_call(
      'rsd_conv_input_grad', jax.ShapeDtypeStruct(x.shape, jnp.float32),
      vmap_method='sequential')(dz, kernel, **attrs)
  dbias = dz.reshape(-1, dz.shape[-1]).sum(0)
  if batch_axes:
    dkernel, dbias = lax.psum((dkernel, dbias), batch_axes)
  return dx, dkernel, dbias


def _on_mesh(fn, mesh, batch_axes, in_specs, out_specs):
  if mesh is None:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _cpu_conv(x, kernel, bias, strides, padding, activation, fused, mesh,
              batch_axes):
  return _cpu_conv_fwd(x, kernel, bias, strides, padding, activation, fused,
                       mesh, batch_axes)[0]


def _cpu_conv_fwd(x, kernel, bias, strides, padding, activation, fused, mesh,
                  batch_axes):
  rows = P(batch_axes or None)
  forward = _on_mesh(
      functools.partial(_ffi_forward, strides=strides, padding=padding,
                        activation=activation, fused=fused),
      mesh, batch_axes, (rows, P(), P()), rows)
  y = forward(x, kernel, bias)
  # ReLU's output is its own gradient mask: y > 0 where the input was.
  return y, (x, kernel, y if activation == 'relu' else None)


def _cpu_conv_bwd(strides, padding, activation, fused, mesh, batch_axes,
                  residuals, dy):
  del fused
  x, kernel, y = residuals
  dz = dy.astype(jnp.float32)
  if activation == 'relu':
    dz = jnp.where(y > 0, dz, 0.0)
  rows = P(batch_axes or None)
  grads = _on_mesh(
      functools.partial(_ffi_grads, strides=strides, padding=padding,
                        batch_axes=batch_axes if mesh is not None else ()),
      mesh, batch_axes, (rows, P(), rows), (rows, P(), P()))
  return grads(x, kernel, dz)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


# --- Choosing -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvOp:
  """The convolution op as chosen for one model (module docstring).

  Attributes:
    implementation: one of `IMPLEMENTATIONS`.
    strict: raise (instead of using 'xla') on a call the kernel cannot run:
      the kernel was named in the config, not chosen by 'auto'.
    mesh: the mesh the model runs on; the CPU kernel runs inside `shard_map`
      over its batch axes (None: called directly).
  """
  implementation: str = XLA
  strict: bool = False
  mesh: Mesh | None = None

  def _batch_axes(self, batch: int) -> tuple[str, ...]:
    if self.mesh is None:
      return ()
    axes = tuple(a for a in BATCH_AXES if a in self.mesh.axis_names)
    if batch % math.prod(self.mesh.shape[a] for a in axes):
      return ()
    return axes

  def __call__(self, x_BxHxWxC, kernel_HxWxIxO, bias_O=None, strides=(1, 1),
               padding: Padding = 'SAME', activation: str | None = None):
    """activation(conv2d(x, kernel) + bias) -> [B, H', W', O]."""
    if activation not in ACTIVATIONS:
      raise ValueError(f'Conv activation {activation!r}: expected one of '
                       f'{ACTIVATIONS}.')
    x, kernel = x_BxHxWxC, kernel_HxWxIxO
    if self.implementation == XLA:
      return reference(x, kernel, bias_O, strides, padding, activation)
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
      reason = f'dtype {x.dtype} (the kernel is float32)'
      if self.strict:
        raise ValueError(
            f"conv implementation 'cpu_kernel' cannot run x {x.shape} "
            f'{x.dtype}, kernel {kernel.shape}: {reason}; xla can '
            '(config.model.conv).')
      _log_fallback(reason)
      return reference(x, kernel, bias_O, strides, padding, activation)
    strides = tuple(int(s) for s in strides)
    pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    if bias_O is None:
      bias_O = jnp.zeros((kernel.shape[-1],), jnp.float32)
    fused = int(np.prod(kernel.shape)) * 4 <= FORWARD_KERNEL_MAX_BYTES
    batch_axes = self._batch_axes(x.shape[0])
    mesh = self.mesh if batch_axes else None
    return _cpu_conv(x, kernel, bias_O.astype(jnp.float32), strides, pads,
                     activation, fused, mesh, batch_axes)


@functools.cache
def _log_fallback(reason: str) -> None:
  logging.info('conv: cpu_kernel cannot run %s; using xla for it.', reason)


def choose(name: str = AUTO, platform: str | None = None,
           mesh: Mesh | None = None) -> ConvOp:
  """The convolution op for `config.model.conv=name` on `platform`.

  Building the CPU kernel (a C++ compiler's work, once per machine) happens
  here, for 'auto' and 'cpu_kernel' on the CPU backend.

  Raises:
    ValueError: an unknown name; 'cpu_kernel' on another backend, or on a
      CPU where the kernels do not build (saying why).
  """
  if name not in CHOICES:
    raise ValueError(f'config.model.conv={name!r}: expected one of '
                     f'{CHOICES}.')
  platform = ops_platform.name(platform)
  if name == XLA or (name == AUTO and platform != 'cpu'):
    return ConvOp(XLA, mesh=mesh)
  if platform != 'cpu':
    raise ValueError(f"config.model.conv='cpu_kernel' cannot run on the "
                     f"{platform} backend; it runs: xla (or 'auto').")
  reason = cpu_kernels.unavailable_reason()
  if reason:
    if name == CPU_KERNEL:
      raise ValueError(f"config.model.conv='cpu_kernel' cannot run: {reason}; "
                       "xla can (or 'auto').")
    cpu_kernels.warn_unavailable('The CPU convolution kernel', 'xla', reason)
    return ConvOp(XLA, mesh=mesh)
  return ConvOp(CPU_KERNEL, strict=name == CPU_KERNEL, mesh=mesh)


class Conv(nn.Module):
  """`flax.linen.Conv` for NHWC images, run by a `ConvOp`.

  Parameters `kernel` [kh, kw, in, out] and `bias` [out], initialised like
  `nn.Conv` (LeCun normal, zeros), so it reads and writes the same trees.
  """
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = 'SAME'
  use_bias: bool = True
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  activation: str | None = None  # None or 'relu', fused where it can be.
  op: ConvOp = ConvOp()

  @nn.compact
  def __call__(self, x_BxHxWxC):
    if x_BxHxWxC.ndim != 4:
      raise ValueError(f'Conv {self.name}: expected NHWC input, got shape '
                       f'{x_BxHxWxC.shape}.')
    kernel_size = tuple(self.kernel_size)
    strides = ((self.strides,) * 2 if isinstance(self.strides, int)
               else tuple(self.strides))
    kernel = self.param('kernel', self.kernel_init,
                        kernel_size + (x_BxHxWxC.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x_BxHxWxC, kernel, bias,
                                              dtype=self.dtype)
    return self.op(x, kernel, bias, strides, self.padding, self.activation)
