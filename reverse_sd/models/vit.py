"""CLIP-style vision transformer in Flax linen.

Pre-LayerNorm transformer with a class token, learned position embeddings
and CLIP's `ln_pre`/`ln_post`, laid out like Hugging Face's CLIPVisionModel
(separate q/k/v projections, `layer_norm1`/`layer_norm2`, `mlp.fc1/fc2`) so a
converter table maps real checkpoints onto it one to one.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a CLIP vision tower."""
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  activation: str = 'quick_gelu'  # OpenAI CLIP; open_clip H/14 uses 'gelu'.
  layer_norm_eps: float = 1e-5


VARIANTS = {
    'tiny': ViTConfig(patch_size=8, width=32, layers=2, heads=2, mlp_dim=64),
    'small': ViTConfig(patch_size=8, width=128, layers=4, heads=4,
                       mlp_dim=512),
    'B/16': ViTConfig(patch_size=16, width=768, layers=12, heads=12,
                      mlp_dim=3072),
    'L/14': ViTConfig(patch_size=14, width=1024, layers=24, heads=16,
                      mlp_dim=4096),
    'H/14': ViTConfig(patch_size=14, width=1280, layers=32, heads=16,
                      mlp_dim=5120, activation='gelu'),
}


def _activation(name: str):
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise ValueError(f'Unknown activation {name!r}.')


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections."""
  width: int
  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    head_dim = self.width // self.heads
    dense = lambda name: nn.Dense(self.width, dtype=self.dtype, name=name)
    split = lambda y: y.reshape(*y.shape[:-1], self.heads, head_dim)
    q = split(dense('q_proj')(x_BxTxD))
    k = split(dense('k_proj')(x_BxTxD))
    v = split(dense('v_proj')(x_BxTxD))
    out = jax.nn.dot_product_attention(q, k, v)
    out = out.reshape(*out.shape[:-2], self.width)
    return dense('out_proj')(out)


class EncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x))."""
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps,
                                     dtype=self.dtype, name=name)
    x = x + Attention(cfg.width, cfg.heads, self.dtype,
                      name='self_attn')(norm('layer_norm1')(x))
    y = norm('layer_norm2')(x)
    y = nn.Dense(cfg.mlp_dim, dtype=self.dtype, name='fc1')(y)
    y = _activation(cfg.activation)(y)
    y = nn.Dense(cfg.width, dtype=self.dtype, name='fc2')(y)
    return x + y


class VisionTransformer(nn.Module):
  """CLIP vision tower: images [B,H,W,3] (normalised) -> pooled [B,width]."""
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images_BxHxWx3):
    cfg = self.config
    x = nn.Conv(cfg.width, (cfg.patch_size,) * 2, strides=cfg.patch_size,
                padding='VALID', use_bias=False, dtype=self.dtype,
                name='patch_embedding')(images_BxHxWx3)
    batch = x.shape[0]
    x = x.reshape(batch, -1, cfg.width)
    cls = self.param('class_embedding', nn.initializers.normal(0.02),
                     (cfg.width,))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1)
    pos = self.param('position_embedding', nn.initializers.normal(0.02),
                     (x.shape[1], cfg.width))
    x = x + pos.astype(x.dtype)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                     name='pre_layrnorm')(x)
    for i in range(cfg.layers):
      x = EncoderLayer(cfg, self.dtype, name=f'layers_{i}')(x)
    pooled = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                          name='post_layernorm')(x[:, 0])
    return pooled
