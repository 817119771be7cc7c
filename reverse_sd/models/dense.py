"""`nn.Dense` whose matrix product sees two-dimensional operands.

`flax.linen.Dense` contracts the last axis of a [B, T, D] input directly, and
its weight gradient contracts two axes (B and T) of both operands. `Dense`
here folds the leading axes into one before the product and unfolds them
after: the same parameters ('kernel', 'bias'), initialisers and dtype
promotion as `nn.Dense`, and the same result, so checkpoints and converters
are unchanged. The folded axis keeps the batch sharding: B is its major part.

Its bias is added by `add_bias`, whose gradient (the output gradient summed
over every row) is, on the CPU backend, a product with a vector of ones:
XLA:CPU runs that column sum as a strided reduce-window at under 1 GB/s
(ViT-B/16's fc1 bias: 17 ms, the product 3 ms), its matrix-vector product
at memory speed. Elsewhere it is XLA's reduction.

Speed: in the whole ViT-B/16 train step on XLA:CPU the folding's difference
from `nn.Dense` is within noise (`benchmarks/ab_step.py --change=dense`),
the bias gradient's is in `benchmarks/RESULTS.md` (`--change=bias_grad`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def _add_bias_rows(y, bias):
  return y + bias


def _add_bias_rows_fwd(y, bias):
  return y + bias, None


def bias_grad(dy):
  """dy summed over every axis but the last, as a product with a vector of
  ones (see the module docstring); float32."""
  rows = dy.reshape(-1, dy.shape[-1])
  return lax.dot_general(jnp.ones((rows.shape[0],), rows.dtype), rows,
                         (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _add_bias_rows_bwd(_, dy):
  return dy, bias_grad(dy).astype(dy.dtype)


_add_bias_rows.defvjp(_add_bias_rows_fwd, _add_bias_rows_bwd)


def _bias_grad_as_product() -> bool:
  # Looked up at trace time (benchmarks/ab_step.py --change=bias_grad
  # swaps it).
  return jax.default_backend() == 'cpu'


def add_bias(y, bias):
  """y + bias over y's last axis; on CPU with the gradient described in the
  module docstring (the same values up to summation order)."""
  bias = bias.astype(y.dtype)
  if not _bias_grad_as_product():
    return y + bias
  return _add_bias_rows(y, bias)


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None,
                     preferred_element_type=None, **kwargs):
  """`lax.dot_general` with the lhs's leading axes folded into one.

  Only the Dense pattern (lhs [..., K] against rhs [K, ...], no batch axes)
  is folded; anything else goes to `lax.dot_general` unchanged.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (lhs.ndim <= 2 or lhs_batch or rhs_batch
      or tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,)):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  lead, features = lhs.shape[:-1], rhs.shape[1:]
  out = lax.dot_general(
      lhs.reshape(-1, lhs.shape[-1]), rhs.reshape(rhs.shape[0], -1),
      (((1,), (0,)), ((), ())), precision=precision,
      preferred_element_type=preferred_element_type, **kwargs)
  return out.reshape(*lead, *features)


def _dot_general(*args, **kwargs):
  # Looks the function up at call time (benchmarks/ab_step.py swaps it).
  return flat_dot_general(*args, **kwargs)


class Dense(nn.Dense):
  """`nn.Dense` (same fields and parameters) using `flat_dot_general` and
  `add_bias`."""
  dot_general: Any = _dot_general

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param('kernel', self.kernel_init,
                        (inputs.shape[-1], self.features), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias,
                                              dtype=self.dtype)
    y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                         precision=self.precision)
    return y if bias is None else add_bias(y, bias)
