"""2-D convolution whose backward pass is fast on CPU.

XLA:CPU runs a strided convolution's gradients at a third to a half of its
forward speed (on the default synthetic ConvNet's second convolution, 28
GFLOP/s for the gradients against 81 for the forward pass on 2 cores;
PyTorch's oneDNN 52). `conv2d` keeps XLA's forward convolution and computes
the gradients one of three ways (`grad_impl`):

- 'cpu_kernel': `cpu_conv.cc`, typed XLA FFI calls that read the input and
  the output gradient in place, with register-blocked tiles, on XLA's
  intra-op threads (`cpu_kernels.py` builds it on first use). The kernel
  gradient is a sum over the batch, which the SPMD partitioner would compute
  on a gathered batch: 'auto' uses the kernels only in a one-device process.
- 'matmul': one matrix product per kernel tap,

    dK[i, j] = tap_ij(x_padded)^T @ dY          ([C_in, B*H'*W'] @ [.., C_out])
    dX       = sum_ij place_ij(dY @ K[i, j]^T)  (strided, zero-filled placement)

  where `tap_ij` is the strided slice of the padded input that meets kernel
  position (i, j): plain XLA, sharded like the rest of the step.
- 'xla': XLA's own convolution gradients.

'auto' is 'cpu_kernel' on CPU in a one-device process (float32, the kernels
built), else 'matmul' on CPU, and 'xla' on accelerators, whose vendor
convolution kernels are fast. Non-overlapping patches (ViT's patch
embedding) take 'matmul' under 'auto': one matrix product each way.

`Conv` is a drop-in for `flax.linen.Conv` (same parameter names, shapes and
initialisers, so checkpoints and converters do not change) for NHWC inputs,
2-D kernels, no dilation and no feature groups.
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from reverse_sd.models import cpu_kernels
from reverse_sd.models import dense

GRAD_IMPLS = ('auto', 'xla', 'matmul', 'cpu_kernel')
_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

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


def _forward(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_DIMENSION_NUMBERS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grad(x, kernel, strides, padding):
  return _forward(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return _forward(x, kernel, strides, padding), (x, kernel)


def _patch_bwd(x, kernel, dy):
  """Non-overlapping patches (kernel = stride, no padding; ViT's patch
  embedding): one [p*p*C, N] x [N, C_out] product, the patches a reshape."""
  batch, _, _, channels = x.shape
  kh, kw, _, out_channels = kernel.shape
  _, oh, ow, _ = dy.shape
  used = x[:, :oh * kh, :ow * kw, :]
  patches = used.reshape(batch, oh, kh, ow, kw, channels).transpose(
      0, 1, 3, 2, 4, 5).reshape(-1, kh * kw * channels)
  dy_NxO = dy.reshape(-1, out_channels)
  kernel_KxO = kernel.reshape(-1, out_channels)
  dkernel = jnp.dot(patches.T, dy_NxO, preferred_element_type=jnp.float32)
  dpatches = jnp.dot(dy_NxO, kernel_KxO.T)
  dx_used = dpatches.reshape(batch, oh, ow, kh, kw, channels).transpose(
      0, 1, 3, 2, 4, 5).reshape(used.shape)
  dx = jnp.pad(dx_used, ((0, 0), (0, x.shape[1] - used.shape[1]),
                         (0, x.shape[2] - used.shape[2]), (0, 0)))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype).reshape(
      kernel.shape)


def _conv_bwd(strides, padding, residuals, dy):
  """Gradients as one [C_in, N] x [N, C_out] product per kernel tap."""
  x, kernel = residuals
  batch, _, _, channels = x.shape
  kh, kw, _, out_channels = kernel.shape
  _, oh, ow, _ = dy.shape
  sh, sw = strides
  if (kh, kw) == (sh, sw) and all(p == (0, 0) for p in padding):
    return _patch_bwd(x, kernel, dy)
  (pt, pb), (pl, pr) = padding
  # Negative padding (a crop) is legal in lax.pad, as in the convolution.
  x_pad = lax.pad(x, jnp.zeros((), x.dtype),
                  ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  hp, wp = x_pad.shape[1], x_pad.shape[2]
  dy_NxO = dy.reshape(-1, out_channels)
  dkernel_taps = []
  dx_pad = None
  for i in range(kh):
    for j in range(kw):
      end_h, end_w = i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1
      tap = lax.slice(x_pad, (0, i, j, 0), (batch, end_h, end_w, channels),
                      (1, sh, sw, 1))
      dkernel_taps.append(
          jnp.dot(tap.reshape(-1, channels).T, dy_NxO,
                  preferred_element_type=jnp.float32).astype(kernel.dtype))
      dtap = jnp.dot(dy_NxO, kernel[i, j].T).reshape(batch, oh, ow, channels)
      # Put the tap's gradient back where the tap came from: stride-1 zeros
      # between its rows and columns, offset (i, j) in the padded input.
      placed = lax.pad(dtap, jnp.zeros((), dtap.dtype),
                       ((0, 0, 0), (i, hp - end_h, sh - 1),
                        (j, wp - end_w, sw - 1), (0, 0, 0)))
      dx_pad = placed if dx_pad is None else dx_pad + placed
  dx = lax.pad(dx_pad, jnp.zeros((), dx_pad.dtype),
               ((0, 0, 0), (-pt, -pb, 0), (-pl, -pr, 0), (0, 0, 0)))
  dkernel = jnp.stack(dkernel_taps).reshape(kernel.shape)
  return dx.astype(x.dtype), dkernel


_conv_matmul_grad.defvjp(_conv_fwd, _conv_bwd)


def _ffi_attrs(strides, padding):
  (pt, _), (pl, _) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(pt), pad_left=np.int64(pl))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_kernel_grad(x, kernel, strides, padding):
  return _forward(x, kernel, strides, padding)


def _conv_kernel_bwd(strides, padding, residuals, dy):
  """Both gradients from `cpu_conv.cc`, reading x and dy in place."""
  x, kernel = residuals
  attrs = _ffi_attrs(strides, padding)
  dy = dy.astype(jnp.float32)
  dkernel = jax.ffi.ffi_call(
      'rsd_conv_kernel_grad',
      jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
      vmap_method='sequential')(x, dy, **attrs)
  dx = jax.ffi.ffi_call(
      'rsd_conv_input_grad', jax.ShapeDtypeStruct(x.shape, jnp.float32),
      vmap_method='sequential')(dy, kernel, **attrs)
  return dx, dkernel


_conv_kernel_grad.defvjp(_conv_fwd, _conv_kernel_bwd)


ACTIVATIONS = (None, 'relu')
# The FFI forward pass reads its kernel's slice for every tile of 12 output
# pixels from cache: above this size (about half of a 2 MB L2 cache) it ran
# slower than XLA's convolution in a one-off timing on a 2-core Xeon (a 3x3
# convolution of 320 to 320 channels, 3.7 MB: about half XLA's speed), so
# larger kernels keep XLA's forward pass, with the bias and activation after
# it.
FORWARD_KERNEL_MAX_BYTES = 1536 << 10


def _output_shape(x_shape, kernel_shape, strides, padding):
  n, h, w, _ = x_shape
  kh, kw, _, out_channels = kernel_shape
  (pt, pb), (pl, pr) = padding
  return (n, (h + pt + pb - kh) // strides[0] + 1,
          (w + pl + pr - kw) // strides[1] + 1, out_channels)


def _ffi_forward(x, kernel, bias, strides, padding, activation):
  out = jax.ShapeDtypeStruct(
      _output_shape(x.shape, kernel.shape, strides, padding), jnp.float32)
  return jax.ffi.ffi_call('rsd_conv_forward', out, vmap_method='sequential')(
      x, kernel, bias, **_ffi_attrs(strides, padding),
      relu=np.int64(activation == 'relu'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv_bias_act_kernel(x, kernel, bias, strides, padding, activation):
  return _ffi_forward(x, kernel, bias, strides, padding, activation)


def _conv_bias_act_fwd(x, kernel, bias, strides, padding, activation):
  y = _ffi_forward(x, kernel, bias, strides, padding, activation)
  # ReLU's output is its own gradient mask: y > 0 where the input was.
  return y, (x, kernel, y if activation == 'relu' else None)


def _conv_bias_act_bwd(strides, padding, activation, residuals, dy):
  x, kernel, y = residuals
  dz = jnp.where(y > 0, dy, 0.0) if activation == 'relu' else dy
  dx, dkernel = _conv_kernel_bwd(strides, padding, (x, kernel), dz)
  return dx, dkernel, dense.bias_grad(dz)


_conv_bias_act_kernel.defvjp(_conv_bias_act_fwd, _conv_bias_act_bwd)


def conv_bias_act(x_BxHxWxC, kernel_HxWxIxO, bias_O=None,
                  strides: Sequence[int] = (1, 1), padding: Padding = 'SAME',
                  activation: str | None = None, grad_impl: str = 'auto'):
  """activation(conv2d(x, kernel) + bias) in one pass where it can.

  With the FFI kernels ('cpu_kernel', or 'auto' resolving to it) and a
  kernel of at most `FORWARD_KERNEL_MAX_BYTES`, the convolution, the bias
  and the ReLU are one call (`cpu_conv.cc`'s forward pass: the output is
  written once) and the gradients are the kernels' (the ReLU mask from the
  output); otherwise `conv2d`, `dense.add_bias` and `jax.nn.relu` one after
  another. Same values up to summation order.

  Args:
    x_BxHxWxC: input.
    kernel_HxWxIxO: kernel, same dtype as the input.
    bias_O: [O] or None.
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).
    activation: None or 'relu'.
    grad_impl: as for `conv2d`.

  Returns:
    [B, H', W', O].
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f'Conv activation {activation!r}: expected one of '
                     f'{ACTIVATIONS}.')
  strides, pads, impl = _plan(x_BxHxWxC, kernel_HxWxIxO, strides, padding,
                              grad_impl)
  fits = (np.prod(kernel_HxWxIxO.shape) * 4 <= FORWARD_KERNEL_MAX_BYTES)
  if impl == 'cpu_kernel' and fits:
    if bias_O is None:
      bias_O = jnp.zeros((kernel_HxWxIxO.shape[-1],), jnp.float32)
    return _conv_bias_act_kernel(x_BxHxWxC, kernel_HxWxIxO,
                                 bias_O.astype(jnp.float32), strides, pads,
                                 activation)
  y = conv2d(x_BxHxWxC, kernel_HxWxIxO, strides, pads, grad_impl)
  if bias_O is not None:
    y = dense.add_bias(y, bias_O)
  return jax.nn.relu(y) if activation == 'relu' else y


def _kernel_unavailable(x, kernel) -> str | None:
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    return f'dtype {x.dtype} (the kernel is float32)'
  return cpu_kernels.unavailable_reason()


def resolve_grad_impl(grad_impl: str, x=None, kernel=None) -> str:
  """'auto' -> XLA's on accelerators; on CPU the FFI kernels (`cpu_conv.cc`)
  for float32 on a single-device process, else 'matmul'.

  The kernel gradient is a sum over the batch that the SPMD partitioner
  would compute on gathered inputs, so 'auto' keeps it to one device.
  """
  if grad_impl not in GRAD_IMPLS:
    raise ValueError(f'Conv grad_impl {grad_impl!r}: expected one of '
                     f'{GRAD_IMPLS}.')
  if grad_impl == 'cpu_kernel' and x is not None:
    reason = _kernel_unavailable(x, kernel)
    if reason:
      raise ValueError(f"Conv grad_impl 'cpu_kernel' cannot run: {reason}.")
  if grad_impl != 'auto':
    return grad_impl
  if jax.default_backend() != 'cpu':
    return 'xla'
  if (x is not None and jax.device_count() == 1 and
      _kernel_unavailable(x, kernel) is None):
    return 'cpu_kernel'
  return 'matmul'


def _plan(x, kernel, strides, padding, grad_impl):
  """(strides, explicit padding, implementation) of one convolution."""
  strides = tuple(int(s) for s in strides)
  pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
  impl = resolve_grad_impl(grad_impl, x, kernel)
  patches = (tuple(kernel.shape[:2]) == strides and
             all(p == (0, 0) for p in pads))
  if impl == 'cpu_kernel' and grad_impl == 'auto' and patches:
    impl = 'matmul'  # Non-overlapping patches: one matrix product each way.
  return strides, pads, impl


def conv2d(x_BxHxWxC, kernel_HxWxIxO, strides: Sequence[int] = (1, 1),
           padding: Padding = 'SAME', grad_impl: str = 'auto'):
  """NHWC x HWIO convolution; `grad_impl` picks how gradients are computed.

  Args:
    x_BxHxWxC: input.
    kernel_HxWxIxO: kernel, same dtype as the input.
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).
    grad_impl: 'xla' (XLA's convolution gradients), 'matmul' (one matrix
      product per kernel tap, `_conv_bwd`), 'cpu_kernel' (`cpu_conv.cc`) or
      'auto' (see the module docstring).

  Returns:
    [B, H', W', O].
  """
  strides, pads, impl = _plan(x_BxHxWxC, kernel_HxWxIxO, strides, padding,
                              grad_impl)
  if impl == 'xla':
    return _forward(x_BxHxWxC, kernel_HxWxIxO, strides, pads)
  if impl == 'cpu_kernel':
    return _conv_kernel_grad(x_BxHxWxC, kernel_HxWxIxO, strides, pads)
  return _conv_matmul_grad(x_BxHxWxC, kernel_HxWxIxO, strides, pads)


class Conv(nn.Module):
  """`flax.linen.Conv` for NHWC images with the CPU-friendly backward pass.

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
  grad_impl: str = 'auto'
  activation: str | None = None  # None or 'relu', fused where it can be.

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
    # The bias gradient as a matrix-vector product on CPU (dense.add_bias).
    return conv_bias_act(x, kernel, bias, strides, self.padding,
                         self.activation, self.grad_impl)
