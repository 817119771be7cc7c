"""The whole SD autoencoder: `sd_vae.VAEEncoder` plus diffusers' decoder.

diffusers' `AutoencoderKL` decoding path (`post_quant_conv` + `Decoder`):
latents [B, h, w, latent_channels] -> conv_in to the last block's channels
-> mid block (resnet, attention, resnet) -> up blocks in reverse channel
order (`UpDecoderBlock2D`: `layers_per_block + 1` resnets, then a nearest 2x
upsample and a 3x3 conv, except in the last block) -> GroupNorm, SiLU,
conv_out to RGB in [-1, 1] (unclipped).

`AutoencoderKL` holds the encoder under `encoder` (the tree of a
`VAEEncoder`, which is what the white-box backbone loads as `backbone/vae`)
and the decoder under `decoder` (with `post_quant_conv` inside it). The
miniature loop trains a small one on the synthetic corpus: its latents are
the space the loop's diffusion generator works in, as SD's U-Net works in
its VAE's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from reverse_sd.models import sd_vae
from reverse_sd.ops import attention as attention_ops

ENCODER = 'encoder'
DECODER = 'decoder'


class UpDecoderBlock2D(nn.Module):
  """diffusers `UpDecoderBlock2D`: resnets, then (unless last) an upsample."""
  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    x = x_BxHxWxC
    for j in range(self.num_layers):
      x = sd_vae.ResnetBlock2D(self.out_channels, self.groups,
                               sd_vae.VAE_NORM_EPS, dtype=self.dtype,
                               name=f'resnets_{j}')(x)
    if self.add_upsample:
      x = sd_vae.Upsample2D(self.out_channels, self.dtype,
                            name='upsamplers_0')(x)
    return x


class VAEDecoder(nn.Module):
  """diffusers `AutoencoderKL` decoding: unscaled latents -> images.

  Attributes:
    config: the autoencoder's shape (the decoder mirrors the encoder).
    dtype: computation dtype (params stay float32).
    attention: the mid block's attention op.
  """
  config: sd_vae.VAEConfig
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, latents_BxHxWxC):
    cfg = self.config
    groups, dtype = cfg.norm_num_groups, self.dtype
    x = latents_BxHxWxC.astype(dtype)
    if cfg.use_quant_conv:
      x = nn.Conv(cfg.latent_channels, (1, 1), dtype=dtype,
                  name='post_quant_conv')(x)
    channels = tuple(reversed(cfg.block_out_channels))
    x = sd_vae.conv3x3(channels[0], dtype, 'conv_in')(x)
    x = sd_vae.VAEMidBlock2D(channels[0], groups, cfg.mid_block_add_attention,
                             dtype=dtype, attention=self.attention,
                             name='mid_block')(x)
    for i, out_channels in enumerate(channels):
      x = UpDecoderBlock2D(out_channels, cfg.layers_per_block + 1, groups,
                           add_upsample=i != len(channels) - 1, dtype=dtype,
                           name=f'up_blocks_{i}')(x)
    x = nn.silu(sd_vae.group_norm(groups, sd_vae.VAE_NORM_EPS, dtype,
                                  'conv_norm_out')(x))
    return sd_vae.conv3x3(cfg.in_channels, dtype, 'conv_out')(x).astype(
        jnp.float32)


class AutoencoderKL(nn.Module):
  """Encoder and decoder of an SD-style KL autoencoder.

  `__call__(images, rng)` returns (reconstruction, mean, logvar), sampling
  the latent from the encoder's Gaussian with `rng` (the mean when rng is
  None); `encode` gives the scaled latents the diffusion model works on and
  `decode` maps scaled latents back to images.
  """
  config: sd_vae.VAEConfig
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  def setup(self):
    self.encoder = sd_vae.VAEEncoder(self.config, self.dtype, self.attention,
                                     name=ENCODER)
    self.decoder = VAEDecoder(self.config, self.dtype, self.attention,
                              name=DECODER)

  def __call__(self, images_BxHxWx3, rng=None):
    mean, logvar = self.encoder(images_BxHxWx3)
    latents = mean
    if rng is not None:
      latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(
          rng, mean.shape, mean.dtype)
    return self.decoder(latents), mean, logvar

  def encode(self, images_BxHxWx3):
    """Images in [-1, 1] -> scaled latents (the encoder's mean)."""
    return self.encoder.latents(images_BxHxWx3)

  def decode(self, scaled_latents_BxHxWxC):
    """Scaled latents -> images (float32, about [-1, 1])."""
    cfg = self.config
    return self.decoder(scaled_latents_BxHxWxC / cfg.scaling_factor +
                        cfg.shift_factor)
