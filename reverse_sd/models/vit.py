"""CLIP-style vision transformer in Flax linen.

Pre-LayerNorm transformer with a class token, learned position embeddings
and CLIP's `ln_pre`/`ln_post`, laid out like Hugging Face's CLIPVisionModel
(separate q/k/v projections, `layer_norm1`/`layer_norm2`, `mlp.fc1/fc2`) so a
converter table maps real checkpoints onto it one to one
(`reverse_sd.convert.clip`). With `use_projection` the tower ends in CLIP's
`visual_projection` (no bias), giving the image embedding of CLIP's joint
space instead of the pooled feature.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from reverse_sd.ops import attention as attention_ops


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a CLIP vision tower.

  Attributes:
    patch_size: side of the square patches (and the patch conv's stride).
    width: model width D (Hugging Face `hidden_size`).
    layers: number of transformer blocks.
    heads: attention heads per block.
    mlp_dim: hidden size of the MLP (Hugging Face `intermediate_size`).
    activation: 'quick_gelu' (OpenAI CLIP) or 'gelu' (exact; open_clip H/14).
    layer_norm_eps: epsilon of every LayerNorm.
    image_size: the resolution the position embeddings were trained for (a
      checkpoint's `image_size`). Informational: the module takes the number
      of positions from its input, so the param shapes follow the image size
      it is initialised with.
    projection_dim: output size of CLIP's `visual_projection`, used only by a
      `VisionTransformer` with `use_projection=True`.
  """
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  activation: str = 'quick_gelu'  # OpenAI CLIP; open_clip H/14 uses 'gelu'.
  layer_norm_eps: float = 1e-5
  image_size: int = 224
  projection_dim: int = 512


VARIANTS = {
    'tiny': ViTConfig(patch_size=8, width=32, layers=2, heads=2, mlp_dim=64,
                      image_size=32, projection_dim=16),
    'small': ViTConfig(patch_size=8, width=128, layers=4, heads=4,
                       mlp_dim=512, image_size=64, projection_dim=64),
    # openai/clip-vit-base-patch16.
    'B/16': ViTConfig(patch_size=16, width=768, layers=12, heads=12,
                      mlp_dim=3072, projection_dim=512),
    # openai/clip-vit-large-patch14.
    'L/14': ViTConfig(patch_size=14, width=1024, layers=24, heads=16,
                      mlp_dim=4096, projection_dim=768),
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
    'H/14': ViTConfig(patch_size=14, width=1280, layers=32, heads=16,
                      mlp_dim=5120, activation='gelu', projection_dim=1024),
}

# Megatron-style tensor parallelism on the 'model' mesh axis
# (config.mesh.param_preset='tensor_parallel'; see reverse_sd/sharding.py):
# q/k/v and fc1 split their output features (column-parallel; q/k/v by whole
# heads when the axis size divides `heads`), out_proj and fc2 their input
# features (row-parallel), so a block costs one all-reduce after attention
# and one after the MLP. Regexes over the parameter path below `params`
# ('backbone/layers_3/self_attn/q_proj/kernel'); `EncoderLayer` uses these
# names wherever it runs, so they also cover the CLIP text transformer.
PARTITION_RULES = (
    (r'layers_\d+/self_attn/[qkv]_proj/kernel$', (None, 'model')),
    (r'layers_\d+/self_attn/[qkv]_proj/bias$', ('model',)),
    (r'layers_\d+/self_attn/out_proj/kernel$', ('model', None)),
    (r'layers_\d+/fc1/kernel$', (None, 'model')),
    (r'layers_\d+/fc1/bias$', ('model',)),
    (r'layers_\d+/fc2/kernel$', ('model', None)),
)


def _activation(name: str):
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise ValueError(f'Unknown activation {name!r}.')


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections; `op` runs
  softmax(q k^T / sqrt(d)) v (reverse_sd/ops/attention.py)."""
  width: int
  heads: int
  dtype: jnp.dtype = jnp.float32
  op: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x_BxTxD, causal: bool = False, queries_BxQxD=None):
    """Attends over the T axis.

    Args:
      x_BxTxD: input tokens (the keys and values).
      causal: token i attends only to tokens j <= i (the CLIP text
        transformer); False attends everywhere (the vision tower).
      queries_BxQxD: the tokens that query (default: all of `x_BxTxD`); the
        output has one row per query.
    """
    head_dim = self.width // self.heads
    linear = lambda name: nn.Dense(self.width, dtype=self.dtype, name=name)
    split = lambda y: y.reshape(*y.shape[:-1], self.heads, head_dim)
    queries = x_BxTxD if queries_BxQxD is None else queries_BxQxD
    q = split(linear('q_proj')(queries))
    k = split(linear('k_proj')(x_BxTxD))
    v = split(linear('v_proj')(x_BxTxD))
    out = self.op(q, k, v, causal=causal)
    out = out.reshape(*out.shape[:-2], self.width)
    return linear('out_proj')(out)


class EncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x)).

  `config` is a `ViTConfig` or any config with the same `width`, `heads`,
  `mlp_dim`, `activation` and `layer_norm_eps` fields (the CLIP text
  transformer's `ClipTextConfig`). `causal` is passed to `Attention`, and
  `attention` is its op.
  """
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x, causal: bool = False,
               query_tokens: int | None = None):
    """[B, T, D] -> [B, T, D], or [B, query_tokens, D]: with `query_tokens`,
    only the first `query_tokens` tokens are updated (attending to all T)
    and returned, which is all a read-out of those tokens needs."""
    cfg = self.config
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps,
                                     dtype=self.dtype, name=name)
    h = norm('layer_norm1')(x)
    if query_tokens is None:
      x = x + Attention(cfg.width, cfg.heads, self.dtype, self.attention,
                        name='self_attn')(h, causal)
    else:
      x = x[:, :query_tokens] + Attention(
          cfg.width, cfg.heads, self.dtype, self.attention, name='self_attn')(
              h, causal, queries_BxQxD=h[:, :query_tokens])
    y = norm('layer_norm2')(x)
    y = nn.Dense(cfg.mlp_dim, dtype=self.dtype, name='fc1')(y)
    y = _activation(cfg.activation)(y)
    y = nn.Dense(cfg.width, dtype=self.dtype, name='fc2')(y)
    return x + y


class VisionTransformer(nn.Module):
  """CLIP vision tower: images [B,H,W,3] (normalised) -> pooled [B,width].

  The position embedding has one row per patch of the input plus one for the
  class token, so its shape follows the image size the module is initialised
  with ((H // patch) * (W // patch) + 1 rows).

  Attributes:
    config: the tower's shape.
    dtype: computation dtype (params stay float32).
    use_projection: end in CLIP's `visual_projection` (Dense without bias,
      width -> `config.projection_dim`) and return the image embedding
      [B, projection_dim] instead of the pooled feature.
    attention: the attention op (reverse_sd/ops/attention.py; default:
      XLA's).
  """
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32
  use_projection: bool = False
  attention: attention_ops.Attention = attention_ops.Attention()

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
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps,
                                     dtype=self.dtype, name=name)
    x = norm('pre_layrnorm')(x)
    for i in range(cfg.layers):
      # The read-out is the class token: the last layer updates only it
      # (the same result with ~1/cfg.layers fewer FLOPs).
      last = i == cfg.layers - 1
      x = EncoderLayer(cfg, self.dtype, self.attention,
                       name=f'layers_{i}')(x, query_tokens=1 if last else None)
    pooled = norm('post_layernorm')(x[:, 0])
    if not self.use_projection:
      return pooled
    if cfg.projection_dim <= 0:
      raise ValueError(f'use_projection=True needs ViTConfig.projection_dim > '
                       f'0, got {cfg.projection_dim}.')
    return nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                    name='visual_projection')(pooled)
