"""Heads from backbone features to the prompt embedding."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


def l2_normalize(x, axis: int = -1, eps: float = 1e-6):
  """x / max(||x||, eps), computed in float32."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


class EmbeddingHead(nn.Module):
  """Optional GELU MLP, then Dense to `embedding_dim`, L2-normalised.

  `hidden=(8192, 8192)` on 1024-d features is the paper's CLIP MLP
  (1024 -> 8192 -> 8192 -> 384).
  """
  embedding_dim: int = 384
  hidden: Sequence[int] = ()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features_BxF):
    x = features_BxF
    for i, width in enumerate(self.hidden):
      x = nn.gelu(nn.Dense(width, dtype=self.dtype, name=f'hidden_{i}')(x))
    x = nn.Dense(self.embedding_dim, dtype=self.dtype, name='projection')(x)
    return l2_normalize(x)
