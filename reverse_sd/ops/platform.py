"""The backend the ops are chosen for, and its default compute dtype."""

import jax
import jax.numpy as jnp

ACCELERATORS = ('gpu', 'tpu')


def name(platform: str | None = None) -> str:
  """'cpu', 'gpu' or 'tpu' (also 'rocm' and others as JAX names them):
  `platform` ('cuda' counts as 'gpu'), or JAX's default backend."""
  platform = (platform or jax.default_backend()).lower()
  return 'gpu' if platform == 'cuda' else platform


def compute_dtype(dtype_name: str, platform: str | None = None) -> jnp.dtype:
  """`config.model.dtype` as a dtype; 'auto' is bfloat16 on GPU and TPU and
  float32 elsewhere. Parameters and optimiser state stay float32 either
  way."""
  if dtype_name == 'auto':
    return jnp.dtype(jnp.bfloat16 if name(platform) in ACCELERATORS
                     else jnp.float32)
  try:
    return jnp.dtype(dtype_name)
  except TypeError as e:
    raise ValueError(f'config.model.dtype={dtype_name!r} is not a dtype name '
                     "(e.g. 'auto', 'float32', 'bfloat16').") from e
