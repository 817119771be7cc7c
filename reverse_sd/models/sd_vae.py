"""Stable Diffusion VAE encoder in Flax linen, and the layers the U-Net shares.

A port of diffusers' `AutoencoderKL` encoding path (`encoder` + `quant_conv`,
diffusers 0.42): images [B, H, W, 3] in [-1, 1] -> the latent Gaussian's mean
and log-variance [B, H/f, W/f, latent_channels], f = 2^(len(blocks) - 1).
Multiply the mean by the config's `scaling_factor` (0.18215 for SD 1.x/2.x)
to get the latents the U-Net was trained on (`VAEEncoder.latents`).

Layout is NHWC throughout. Modules and params are named after diffusers'
(`down_blocks_0/resnets_1/norm2`, `mid_block/attentions_0/to_q`, ...) so the
mapping table in `reverse_sd.convert.sd` reads one to one; the VAE's
`encoder.` level is dropped (`encoder.conv_in` -> `conv_in`).

`ResnetBlock2D`, `Downsample2D`, `Upsample2D`, `group_norm`, `conv3x3` and
`dot_product_attention` are shared with the U-Net
(`reverse_sd.models.sd_unet`), which uses them with a time embedding and
the U-Net's downsample padding.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from reverse_sd.ops import attention as attention_ops

# Every SD VAE encoder block (diffusers `DownEncoderBlock2D`).
DOWN_ENCODER_BLOCK = 'DownEncoderBlock2D'
# diffusers hard-codes this eps for every VAE encoder norm.
VAE_NORM_EPS = 1e-6
# diffusers `DiagonalGaussianDistribution` clamps the log-variance to this.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Shape of a diffusers `AutoencoderKL` encoder (from vae/config.json).

  Attributes:
    block_out_channels: channels of each down block (SD: 128, 256, 512, 512).
    layers_per_block: ResnetBlock2D per down block.
    norm_num_groups: groups of every GroupNorm.
    latent_channels: channels of the latent (SD 1.x/2.x: 4).
    in_channels: image channels.
    down_block_types: one 'DownEncoderBlock2D' per block (the only type SD
      VAEs use).
    scaling_factor: latents = (mean - shift_factor) * scaling_factor.
    shift_factor: 0 for SD 1.x/2.x (diffusers' `shift_factor: null`).
    use_quant_conv: apply the 1x1 `quant_conv` to the moments.
    mid_block_add_attention: the mid block has its self-attention layer.
  """
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  latent_channels: int = 4
  in_channels: int = 3
  down_block_types: tuple[str, ...] = (DOWN_ENCODER_BLOCK,) * 4
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    if len(self.down_block_types) != len(self.block_out_channels):
      raise ValueError(
          f'VAEConfig: {len(self.down_block_types)} down_block_types but '
          f'{len(self.block_out_channels)} block_out_channels')
    unsupported = sorted(set(self.down_block_types) - {DOWN_ENCODER_BLOCK})
    if unsupported:
      raise ValueError(f'VAEConfig: down block types {unsupported} are not '
                       f'supported (only {DOWN_ENCODER_BLOCK!r})')
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        raise ValueError(f'VAEConfig: {channels} channels do not split into '
                         f'{self.norm_num_groups} norm groups')

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side (SD: 8)."""
    return 2 ** (len(self.block_out_channels) - 1)


# SD 1.x and 2.x share one VAE shape (stabilityai/sd-vae-ft-mse and the VAEs
# of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1).
SD_VAE = VAEConfig()


# --- Layers shared with the U-Net ---------------------------------------------


def group_norm(groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
  """torch.nn.GroupNorm over NHWC (or [B, T, C]) inputs.

  Two-pass variance (`use_fast_variance=False`), as PyTorch computes it.
  """
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype,
                      use_fast_variance=False, name=name)


def conv3x3(features: int, dtype, name: str, strides: int = 1,
            padding=((1, 1), (1, 1))) -> nn.Conv:
  """torch `Conv2d(kernel_size=3, padding=1)` on NHWC inputs."""
  return nn.Conv(features, (3, 3), strides=strides, padding=padding,
                 dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (time_embedding_norm 'default', SiLU).

  norm1 -> SiLU -> conv1 (+ time_emb_proj(SiLU(temb))) -> norm2 -> SiLU ->
  conv2, plus the input (through a 1x1 `conv_shortcut` when the channel count
  changes), divided by `output_scale_factor`.

  Attributes:
    out_channels: output channels.
    groups: GroupNorm groups (both norms).
    eps: GroupNorm epsilon (VAE 1e-6; U-Net `norm_eps`, 1e-5).
    output_scale_factor: divides the sum (U-Net mid block:
      `mid_block_scale_factor`).
    dtype: computation dtype.
  """
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, temb_BxT=None):
    norm = lambda name: group_norm(self.groups, self.eps, self.dtype, name)
    h = conv3x3(self.out_channels, self.dtype, 'conv1')(
        nn.silu(norm('norm1')(x_BxHxWxC)))
    if temb_BxT is not None:
      temb = nn.Dense(self.out_channels, dtype=self.dtype,
                      name='time_emb_proj')(nn.silu(temb_BxT))
      h = h + temb[:, None, None, :]
    h = conv3x3(self.out_channels, self.dtype, 'conv2')(
        nn.silu(norm('norm2')(h)))
    shortcut = x_BxHxWxC
    if x_BxHxWxC.shape[-1] != self.out_channels:
      shortcut = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype,
                           name='conv_shortcut')(shortcut)
    out = shortcut + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nn.Module):
  """diffusers `Downsample2D(use_conv=True)`: a stride-2 3x3 conv.

  `padding` is diffusers': the U-Net pads 1 on every side
  (`downsample_padding=1`); the VAE encoder passes 0, for which diffusers
  pads only the right and bottom by one (`F.pad(x, (0, 1, 0, 1))`) before an
  unpadded conv. Both halve an even side.
  """
  channels: int
  padding: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    if self.padding == 0:
      pad = ((0, 1), (0, 1))
    else:
      pad = ((self.padding, self.padding),) * 2
    return conv3x3(self.channels, self.dtype, 'conv', strides=2,
                   padding=pad)(x_BxHxWxC)


class Upsample2D(nn.Module):
  """diffusers `Upsample2D(use_conv=True)`: nearest 2x, then a 3x3 conv
  (the U-Net's up blocks and the VAE decoder's)."""
  channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    batch, height, width, channels = x_BxHxWxC.shape
    x = jax.image.resize(x_BxHxWxC, (batch, 2 * height, 2 * width, channels),
                         'nearest')
    return conv3x3(self.channels, self.dtype, 'conv')(x)


def dot_product_attention(q_BxTxD, k_BxSxD, v_BxSxD, heads: int,
                          op: attention_ops.Attention, upcast: bool = False):
  """Multi-head softmax attention, scale 1/sqrt(head_dim) (diffusers').

  Splits the last axis into `heads` and runs `op` (reverse_sd/ops/
  attention.py); with `upcast` the softmax runs in float32 whatever the
  inputs' dtype (diffusers' `upcast_attention`).
  """
  dtype = q_BxTxD.dtype
  split = lambda x: x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)
  out = op(split(q_BxTxD), split(k_BxSxD), split(v_BxSxD), upcast=upcast)
  return out.reshape(*out.shape[:-2], -1).astype(dtype)


# --- VAE encoder --------------------------------------------------------------


class SpatialSelfAttention(nn.Module):
  """The VAE mid block's attention (diffusers `Attention` built with
  `_from_deprecated_attn_block`): GroupNorm, single-head self-attention over
  the H*W positions with biased to_q/to_k/to_v/to_out, residual add."""
  groups: int
  eps: float
  heads: int = 1
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x_BxHxWxC):
    batch, height, width, channels = x_BxHxWxC.shape
    h = group_norm(self.groups, self.eps, self.dtype, 'group_norm')(x_BxHxWxC)
    h = h.reshape(batch, height * width, channels)
    linear = lambda name: nn.Dense(channels, dtype=self.dtype, name=name)
    h = dot_product_attention(linear('to_q')(h), linear('to_k')(h),
                              linear('to_v')(h), self.heads, self.attention)
    h = linear('to_out')(h)
    return x_BxHxWxC + h.reshape(batch, height, width, channels)


class DownEncoderBlock2D(nn.Module):
  """diffusers `DownEncoderBlock2D`: resnets, then (unless last) a
  downsampler with the VAE's right/bottom padding."""
  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    x = x_BxHxWxC
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, VAE_NORM_EPS,
                        dtype=self.dtype, name=f'resnets_{j}')(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype,
                       name='downsamplers_0')(x)
    return x


class VAEMidBlock2D(nn.Module):
  """diffusers `UNetMidBlock2D` as the VAE uses it: resnet, (attention),
  resnet."""
  channels: int
  groups: int
  add_attention: bool = True
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x_BxHxWxC):
    resnet = lambda name: ResnetBlock2D(self.channels, self.groups,
                                        VAE_NORM_EPS, dtype=self.dtype,
                                        name=name)
    x = resnet('resnets_0')(x_BxHxWxC)
    if self.add_attention:
      x = SpatialSelfAttention(self.groups, VAE_NORM_EPS, dtype=self.dtype,
                               attention=self.attention,
                               name='attentions_0')(x)
    return resnet('resnets_1')(x)


class VAEEncoder(nn.Module):
  """diffusers `AutoencoderKL` encoding: images -> (mean, logvar).

  `__call__(images_BxHxWxC)` takes images in [-1, 1] (NHWC; H and W
  divisible by `config.downsample_factor`) and returns the latent Gaussian's
  mean and log-variance (clamped to [-30, 20] like diffusers), each
  [B, H/f, W/f, latent_channels]. `latents` returns the scaled mean that the
  U-Net consumes.

  Attributes:
    config: the encoder's shape.
    dtype: computation dtype (params stay float32).
    attention: the mid block's attention op (reverse_sd/ops/attention.py).
  """
  config: VAEConfig
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, images_BxHxWxC):
    cfg = self.config
    groups, dtype = cfg.norm_num_groups, self.dtype
    x = conv3x3(cfg.block_out_channels[0], dtype, 'conv_in')(images_BxHxWxC)
    last = len(cfg.block_out_channels) - 1
    for i, channels in enumerate(cfg.block_out_channels):
      x = DownEncoderBlock2D(channels, cfg.layers_per_block, groups,
                             add_downsample=i != last, dtype=dtype,
                             name=f'down_blocks_{i}')(x)
    x = VAEMidBlock2D(cfg.block_out_channels[-1], groups,
                      cfg.mid_block_add_attention, dtype=dtype,
                      attention=self.attention, name='mid_block')(x)
    x = nn.silu(group_norm(groups, VAE_NORM_EPS, dtype, 'conv_norm_out')(x))
    moments = conv3x3(2 * cfg.latent_channels, dtype, 'conv_out')(x)
    if cfg.use_quant_conv:
      moments = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=dtype,
                        name='quant_conv')(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def latents(self, images_BxHxWxC):
    """The U-Net's latents: (mean - shift_factor) * scaling_factor."""
    mean, _ = self(images_BxHxWxC)
    return scale_latents(mean, self.config)


def scale_latents(mean, config: VAEConfig):
  """(mean - shift_factor) * scaling_factor, as SD pipelines scale latents."""
  return (mean - config.shift_factor) * config.scaling_factor
