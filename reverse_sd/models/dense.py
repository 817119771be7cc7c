"""`nn.Dense` whose matrix product sees two-dimensional operands.

`flax.linen.Dense` contracts the last axis of a [B, T, D] input directly, and
its weight gradient contracts two axes (B and T) of both operands. `Dense`
here folds the leading axes into one before the product and unfolds them
after: the same parameters ('kernel', 'bias'), initialisers and dtype
promotion as `nn.Dense`, and the same result, so checkpoints and converters
are unchanged. The folded axis keeps the batch sharding: B is its major part.

Speed: in the whole ViT-B/16 train step on XLA:CPU the difference from
`nn.Dense` is within noise (`benchmarks/ab_step.py --change=dense`,
`benchmarks/RESULTS.md`).
"""

from typing import Any

import flax.linen as nn
from jax import lax


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
  """`nn.Dense` (same fields and parameters) using `flat_dot_general`."""
  dot_general: Any = _dot_general
