"""CLIP-ResNet-style convolutional tower in Flax linen.

The layout of CLIP's ModifiedResNet: a three-convolution stem with average
pooling, bottleneck stages that downsample by average pooling (anti-aliased
strides), and an attention pool whose query is the mean feature and whose
keys carry learned position embeddings, so the pooled vector keeps *where*
things are. Two changes for training from scratch at small scale: GroupNorm
instead of BatchNorm (no batch statistics: the same step on any device count
and at any batch size), and configurable widths and depths.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from reverse_sd.ops import attention as attention_ops
from reverse_sd.ops import conv as conv_ops


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Shape of a CLIP-ResNet-style tower."""
  width: int  # Channels after the stem; stage i has width * 2**i * 4 out.
  stage_blocks: tuple[int, ...]
  heads: int  # Attention-pool heads.
  output_dim: int
  norm_groups: int = 8
  # 'attention': CLIP's attention pool. 'flatten': a Dense layer over the
  # flattened final feature map (every position has its own weights).
  pool: str = 'attention'


VARIANTS = {
    'tiny': ResNetConfig(width=8, stage_blocks=(1, 1), heads=2,
                         output_dim=32, norm_groups=4),
    # Sized for 64-px images on CPU (the main job's default is the faster
    # models/convnet.py; README gives the measured comparison).
    'small': ResNetConfig(width=16, stage_blocks=(1, 1, 1), heads=4,
                          output_dim=256),
    'medium': ResNetConfig(width=48, stage_blocks=(2, 2, 2), heads=4,
                           output_dim=384),
    # CLIP RN50's shape (GroupNorm in place of BatchNorm).
    'RN50': ResNetConfig(width=64, stage_blocks=(3, 4, 6, 3), heads=32,
                         output_dim=1024, norm_groups=32),
}


def _avg_pool(x, stride):
  if stride == 1:
    return x
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> avgpool(stride) -> 1x1 (x4) with a pooled shortcut."""
  planes: int
  stride: int
  groups: int
  dtype: jnp.dtype = jnp.float32
  conv: conv_ops.ConvOp = conv_ops.ConvOp()

  @nn.compact
  def __call__(self, x):
    conv = lambda c, k, name: conv_ops.Conv(c, (k, k), padding='SAME',
                                            use_bias=False, dtype=self.dtype,
                                            op=self.conv, name=name)
    norm = lambda name: nn.GroupNorm(num_groups=self.groups, dtype=self.dtype,
                                     name=name)
    out_planes = self.planes * 4
    y = nn.relu(norm('norm1')(conv(self.planes, 1, 'conv1')(x)))
    y = nn.relu(norm('norm2')(conv(self.planes, 3, 'conv2')(y)))
    y = _avg_pool(y, self.stride)
    # Zero-init the last norm's scale so each block starts as the identity.
    y = nn.GroupNorm(num_groups=self.groups, dtype=self.dtype,
                     scale_init=nn.initializers.zeros,
                     name='norm3')(conv(out_planes, 1, 'conv3')(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_planes:
      shortcut = _avg_pool(x, self.stride)
      shortcut = norm('downsample_norm')(
          conv(out_planes, 1, 'downsample_conv')(shortcut))
    return nn.relu(y + shortcut)


class AttentionPool(nn.Module):
  """CLIP's attention pooling: the mean token attends over all positions."""
  heads: int
  output_dim: int
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x_BxHxWxC):
    batch, _, _, channels = x_BxHxWxC.shape
    x = x_BxHxWxC.reshape(batch, -1, channels)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    pos = self.param('position_embedding',
                     nn.initializers.normal(channels**-0.5),
                     (x.shape[1], channels))
    x = x + pos.astype(x.dtype)
    head_dim = channels // self.heads
    split = lambda y: y.reshape(*y.shape[:-1], self.heads, head_dim)
    linear = lambda c, name: nn.Dense(c, dtype=self.dtype, name=name)
    q = split(linear(channels, 'q_proj')(x[:, :1]))
    k = split(linear(channels, 'k_proj')(x))
    v = split(linear(channels, 'v_proj')(x))
    out = self.attention(q, k, v)[:, 0]
    return linear(self.output_dim, 'c_proj')(out.reshape(batch, channels))


class ResNet(nn.Module):
  """Images [B,H,W,3] (normalised) -> pooled features [B,output_dim]."""
  config: ResNetConfig
  dtype: jnp.dtype = jnp.float32
  conv: conv_ops.ConvOp = conv_ops.ConvOp()  # reverse_sd/ops/conv.py.
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, images_BxHxWx3):
    cfg = self.config
    groups = cfg.norm_groups
    x = images_BxHxWx3.astype(self.dtype)
    stem = ((cfg.width // 2, 2), (cfg.width // 2, 1), (cfg.width, 1))
    for i, (channels, stride) in enumerate(stem, start=1):
      x = conv_ops.Conv(channels, (3, 3), strides=stride, padding='SAME',
                        use_bias=False, dtype=self.dtype, op=self.conv,
                        name=f'stem_conv{i}')(x)
      x = nn.relu(nn.GroupNorm(num_groups=min(groups, channels),
                               dtype=self.dtype, name=f'stem_norm{i}')(x))
    x = _avg_pool(x, 2)
    for stage, blocks in enumerate(cfg.stage_blocks):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(cfg.width * 2**stage, stride, groups, self.dtype,
                       self.conv, name=f'layer{stage + 1}_{block}')(x)
    if cfg.pool == 'attention':
      return AttentionPool(cfg.heads, cfg.output_dim, self.dtype,
                           self.attention, name='attnpool')(x)
    if cfg.pool == 'flatten':
      x = x.reshape(x.shape[0], -1)
      return nn.gelu(nn.Dense(cfg.output_dim, dtype=self.dtype,
                              name='flatten_proj')(x))
    raise ValueError(f'ResNetConfig.pool={cfg.pool!r}; expected '
                     "'attention' or 'flatten'.")
