"""The full SD U-Net: the white-box encoder completed with the up path.

diffusers' `UNet2DConditionModel` forward pass, built on `sd_unet`'s blocks:
the encoder (`sd_unet.UNetEncoder`: time embedding, conv_in, down blocks, mid
block) runs under the name `encoder`, and its skip connections feed the up
blocks (`CrossAttnUpBlock2D` / `UpBlock2D`: `layers_per_block + 1` resnets,
each on [x, skip] concatenated on channels and, with attention, followed by a
Transformer2D; then a nearest-neighbour 2x upsample and a 3x3 conv, except
in the last block), then GroupNorm, SiLU and `conv_out` back to
`in_channels`. It predicts the noise (epsilon) or v, whichever it was
trained on (`reverse_sd.loop.diffusion`).

Because the encoder is a submodule, `params['encoder']` has exactly the tree
of a `UNetEncoder` (and of the white-box backbone's `backbone/unet`): the
generator's down path and the white-box reverse model share parameters
one to one, which is what the miniature loop swaps (`reverse_sd.loop`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from reverse_sd.models import sd_unet
from reverse_sd.models import sd_vae
from reverse_sd.ops import attention as attention_ops

ENCODER = 'encoder'
UP_BLOCK_TYPES = {sd_unet.CROSS_ATTN_DOWN_BLOCK: 'CrossAttnUpBlock2D',
                  sd_unet.DOWN_BLOCK: 'UpBlock2D'}


class UpBlock(nn.Module):
  """diffusers `CrossAttnUpBlock2D` or `UpBlock2D` (mirror of down block
  `index`): consumes `layers_per_block + 1` skips, last first."""
  config: sd_unet.UNetConfig
  index: int  # Of the mirrored down block.
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x_BxHxWxC, skips, temb_BxT, context_BxSxE):
    cfg, i = self.config, self.index
    channels = cfg.block_out_channels[i]
    with_attention = cfg.down_block_types[i] == sd_unet.CROSS_ATTN_DOWN_BLOCK
    x = x_BxHxWxC
    for j, skip in enumerate(reversed(skips)):
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = sd_vae.ResnetBlock2D(channels, cfg.norm_num_groups, cfg.norm_eps,
                               dtype=self.dtype, name=f'resnets_{j}')(
                                   x, temb_BxT)
      if with_attention:
        x = sd_unet.Transformer2D(cfg.num_attention_heads[i],
                                  cfg.transformer_layers_per_block[i],
                                  cfg.norm_num_groups, cfg.upcast_attention,
                                  self.dtype, self.attention,
                                  name=f'attentions_{j}')(x, context_BxSxE)
    if i != 0:
      x = sd_vae.Upsample2D(channels, self.dtype, name='upsamplers_0')(x)
    return x


class DiffusionUNet(nn.Module):
  """(noisy images or latents, timesteps, context) -> predicted noise.

  Inputs as `sd_unet.UNetEncoder`'s: x [B, H, W, in_channels] (H and W
  divisible by `config.downsample_factor`), timesteps a scalar or [B],
  context [B, T, cross_attention_dim]. Output: [B, H, W, in_channels],
  float32.

  Attributes:
    config: the U-Net's shape (the up path mirrors the down blocks).
    dtype: computation dtype (params stay float32).
    attention: the attention op of every transformer block.
  """
  config: sd_unet.UNetConfig
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  def setup(self):
    cfg = self.config
    self.encoder = sd_unet.UNetEncoder(cfg, self.dtype, self.attention,
                                       name=ENCODER)
    blocks = len(cfg.block_out_channels)
    # diffusers numbers up blocks from the bottom: up_blocks_0 mirrors the
    # last down block.
    self.up_blocks = [
        UpBlock(cfg, blocks - 1 - k, self.dtype, self.attention,
                name=f'up_blocks_{k}') for k in range(blocks)]
    self.conv_norm_out = sd_vae.group_norm(cfg.norm_num_groups, cfg.norm_eps,
                                           self.dtype, 'conv_norm_out')
    pad = (cfg.conv_in_kernel - 1) // 2
    self.conv_out = nn.Conv(cfg.in_channels, (cfg.conv_in_kernel,) * 2,
                            padding=((pad, pad), (pad, pad)),
                            dtype=self.dtype, name='conv_out')

  def __call__(self, x_BxHxWxC, timesteps, context_BxSxE, class_labels=None):
    cfg = self.config
    stages, skips, temb = self.encoder.down_path(x_BxHxWxC, timesteps,
                                                 context_BxSxE, class_labels)
    context = context_BxSxE.astype(self.dtype)
    x = stages['mid_block']
    skips = list(skips)
    for k, block in enumerate(self.up_blocks):
      n = cfg.layers_per_block[len(cfg.block_out_channels) - 1 - k] + 1
      block_skips, skips = skips[-n:], skips[:-n]
      x = block(x, tuple(block_skips), temb, context)
    x = self.conv_out(nn.silu(self.conv_norm_out(x)))
    return x.astype(jnp.float32)
