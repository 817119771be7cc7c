"""Stable Diffusion U-Net encoder (down blocks + mid block) in Flax linen.

A port of the conditioning path of diffusers' `UNet2DConditionModel`
(diffusers 0.42) up to and including the mid block: sinusoidal timestep
embedding -> `time_embedding` MLP; `conv_in`; the down blocks
(`CrossAttnDownBlock2D`: ResnetBlock2D + Transformer2DModel pairs, then a
stride-2 conv; `DownBlock2D`: resnets only); `UNetMidBlock2DCrossAttn`
(resnet, transformer, resnet). Reverse SD uses the mid block (and the down
blocks' outputs) as image features; `models/diffusion_unet.py` completes this
encoder with the up path into the full denoiser (the miniature loop's
generator), so the white-box encoder and the generator's down path are one
module.

Layout is NHWC; the text context is [B, T, cross_attention_dim]. Modules and
params are named after diffusers' (`down_blocks_0/attentions_1/
transformer_blocks_0/attn2/to_k`) so the mapping table in
`reverse_sd.convert.sd` reads one to one. A Transformer2DModel's `proj_in`
and `proj_out` are always Dense layers here: SD 1.x's 1x1 convs and SD 2.x's
Linear layers are the same per-pixel map, and the converter reshapes
either into the same params. No `nn.scan`: every block has its own params
under its own path, for regex sharding rules.

Heads: diffusers' `attention_head_dim` is, for historical reasons, the
number of HEADS per block (`num_attention_heads = num_attention_heads or
attention_head_dim` in `UNet2DConditionModel.__init__`); each transformer's
head dim is its channel count divided by that. SD 1.x: 8 heads everywhere
(head dims 40, 80, 160); SD 2.x: [5, 10, 20, 20] heads (head dim 64). The
mid block uses the last entry. `UNetConfig.num_attention_heads` holds the
per-block head counts after that translation.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from reverse_sd.models import sd_vae
from reverse_sd.ops import attention as attention_ops

CROSS_ATTN_DOWN_BLOCK = 'CrossAttnDownBlock2D'
DOWN_BLOCK = 'DownBlock2D'
DOWN_BLOCK_TYPES = (CROSS_ATTN_DOWN_BLOCK, DOWN_BLOCK)
# Transformer2DModel's GroupNorm and BasicTransformerBlock's LayerNorms
# (diffusers hard-codes both).
TRANSFORMER_GROUP_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5
# Sinusoidal timestep embedding period (diffusers `get_timestep_embedding`).
MAX_PERIOD = 10000

# Megatron-style tensor parallelism on the 'model' mesh axis
# (config.mesh.param_preset='tensor_parallel'; see reverse_sd/sharding.py),
# regexes over the parameter path below `params`. Attention: to_q/to_k/to_v
# split their output features (by whole heads when the axis size divides the
# heads), to_out its input features. Feed-forward: geglu_proj splits its
# output (value and gate halves land on different devices, so XLA moves
# half the hidden activations once), out_proj its input. Resnets: conv1 (and
# the time embedding added to its output) split the output channels, conv2
# its input channels. The VAE encoder's resnets (sd_vae.ResnetBlock2D) share
# the conv names and get the same split. Other arrays stay replicated (or
# FSDP-split with 'fsdp+tensor_parallel').
PARTITION_RULES = (
    (r'transformer_blocks_\d+/attn\d+/to_[qkv]/kernel$', (None, 'model')),
    (r'transformer_blocks_\d+/attn\d+/to_out/kernel$', ('model', None)),
    (r'transformer_blocks_\d+/ff/geglu_proj/kernel$', (None, 'model')),
    (r'transformer_blocks_\d+/ff/geglu_proj/bias$', ('model',)),
    (r'transformer_blocks_\d+/ff/out_proj/kernel$', ('model', None)),
    (r'resnets_\d+/conv1/kernel$', (None, None, None, 'model')),
    (r'resnets_\d+/conv1/bias$', ('model',)),
    (r'resnets_\d+/time_emb_proj/kernel$', (None, 'model')),
    (r'resnets_\d+/time_emb_proj/bias$', ('model',)),
    (r'resnets_\d+/conv2/kernel$', (None, None, 'model', None)),
)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Shape of a diffusers `UNet2DConditionModel`'s down and mid blocks.

  Per-block fields have one entry per down block; the mid block uses the
  last. Build from a diffusers `unet/config.json` with
  `reverse_sd.convert.sd.unet_config_from_diffusers`.

  Attributes:
    block_out_channels: channels of each down block.
    down_block_types: 'CrossAttnDownBlock2D' or 'DownBlock2D' per block.
    layers_per_block: resnets (and transformers) per down block.
    num_attention_heads: attention heads per block (diffusers'
      `attention_head_dim` config value; see the module docstring).
    transformer_layers_per_block: BasicTransformerBlocks per transformer.
    cross_attention_dim: width of the text context (SD 1.x 768, 2.x 1024).
    use_linear_projection: the checkpoint's proj_in/proj_out are Linear
      (SD 2.x) rather than 1x1 convs (SD 1.x); the converter needs it.
    upcast_attention: run attention in float32 (SD 2.1).
    in_channels: latent channels.
    norm_num_groups: GroupNorm groups.
    norm_eps: the resnets' GroupNorm epsilon.
    flip_sin_to_cos: timestep embedding is [cos, sin] rather than [sin, cos].
    freq_shift: diffusers' `downscale_freq_shift` of the timestep embedding.
    downsample_padding: padding of the stride-2 downsampling convs.
    mid_block_scale_factor: the mid block's resnets divide their output by it.
    conv_in_kernel: kernel size of conv_in.
    time_embedding_dim: width of the time embedding; None: 4 *
      block_out_channels[0].
    projection_class_embeddings_input_dim: diffusers' class_embed_type
      'projection': a `class_embedding` MLP from a vector of this width to
      the time embedding, added to it, so it reaches every resnet. None
      (SD 1.x/2.x): no class embedding. The vector is the call's
      `class_labels`, by default `pooled_context(context)`.
  """
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN_BLOCK,) * 3 + (
      DOWN_BLOCK,)
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  in_channels: int = 4
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  conv_in_kernel: int = 3
  time_embedding_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None

  def __post_init__(self):
    blocks = len(self.block_out_channels)
    for name in ('down_block_types', 'layers_per_block',
                 'num_attention_heads', 'transformer_layers_per_block'):
      if len(getattr(self, name)) != blocks:
        raise ValueError(
            f'UNetConfig: {name} has {len(getattr(self, name))} entries; '
            f'block_out_channels has {blocks}')
    unsupported = sorted(set(self.down_block_types) - set(DOWN_BLOCK_TYPES))
    if unsupported:
      raise ValueError(f'UNetConfig: down block types {unsupported} are not '
                       f'supported (only {list(DOWN_BLOCK_TYPES)})')
    for i, (channels, heads) in enumerate(
        zip(self.block_out_channels, self.num_attention_heads)):
      if channels % self.norm_num_groups:
        raise ValueError(f'UNetConfig: block {i} has {channels} channels, '
                         f'not divisible into {self.norm_num_groups} groups')
      if channels % heads:
        raise ValueError(f'UNetConfig: block {i} has {channels} channels, '
                         f'not divisible into {heads} attention heads')

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def head_dims(self) -> tuple[int, ...]:
    """Attention head dim of each block's transformers (and the mid block's,
    last)."""
    return tuple(c // h for c, h in zip(self.block_out_channels,
                                        self.num_attention_heads))

  @property
  def downsample_factor(self) -> int:
    """Latent pixels per mid-block pixel along each side (SD: 8)."""
    return 2 ** (len(self.block_out_channels) - 1)


VARIANTS = {
    # runwayml/stable-diffusion-v1-5 unet/config.json.
    'sd1.5': UNetConfig(),
    # stabilityai/stable-diffusion-2-1 unet/config.json.
    'sd2.1': UNetConfig(num_attention_heads=(5, 10, 20, 20),
                        cross_attention_dim=1024, use_linear_projection=True,
                        upcast_attention=True),
}


def timestep_embedding(timesteps_B, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float):
  """diffusers `get_timestep_embedding`: [B] timesteps -> [B, dim] float32.

  Frequencies exp(-log(10000) * i / (dim/2 - freq_shift)), i < dim/2; the
  embedding is [sin, cos] of timestep * frequency ([cos, sin] with
  `flip_sin_to_cos`), zero-padded to an odd `dim`.
  """
  half = dim // 2
  exponent = -math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32)
  frequencies = jnp.exp(exponent / (half - freq_shift))
  angles = timesteps_B.astype(jnp.float32)[:, None] * frequencies[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], -1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def pooled_context(context_BxSxE):
  """The mean of the context's non-zero token states, L2-normalised, [B, E].

  For zero-padded MiniLM token states (the miniature loop's generator) this
  is MiniLM's sentence embedding (mean pooling over the real tokens). It is
  the default `class_labels` of a U-Net with a projection class embedding,
  so the generator and the white-box encoder condition on it the same way.
  """
  context = context_BxSxE.astype(jnp.float32)
  real_BxSx1 = jnp.any(context != 0, axis=-1, keepdims=True)
  count_Bx1 = jnp.maximum(jnp.sum(real_BxSx1, axis=1), 1)
  mean_BxE = jnp.sum(context * real_BxSx1, axis=1) / count_Bx1
  norm_Bx1 = jnp.linalg.norm(mean_BxE, axis=-1, keepdims=True)
  return mean_BxE / jnp.maximum(norm_Bx1, 1e-12)


class TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxD):
    x = nn.Dense(self.features, dtype=self.dtype, name='linear_1')(x_BxD)
    return nn.Dense(self.features, dtype=self.dtype,
                    name='linear_2')(nn.silu(x))


class Attention(nn.Module):
  """diffusers `Attention` of a BasicTransformerBlock: to_q/to_k/to_v without
  bias, to_out with bias; self-attention when `context` is None. `op` runs
  the attention itself (reverse_sd/ops/attention.py)."""
  heads: int
  upcast: bool = False
  dtype: jnp.dtype = jnp.float32
  op: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x_BxTxD, context_BxSxE=None):
    width = x_BxTxD.shape[-1]
    context = x_BxTxD if context_BxSxE is None else context_BxSxE
    linear = lambda name, src: nn.Dense(width, use_bias=False,
                                       dtype=self.dtype, name=name)(src)
    out = sd_vae.dot_product_attention(
        linear('to_q', x_BxTxD), linear('to_k', context),
        linear('to_v', context), self.heads, self.op, self.upcast)
    return nn.Dense(width, dtype=self.dtype, name='to_out')(out)


class FeedForward(nn.Module):
  """diffusers `FeedForward` with GEGLU: `geglu_proj` (diffusers
  `ff.net.0.proj`, width -> 2 * 4 * width) splits into value and gate,
  value * GELU(gate) (exact), then `out_proj` (`ff.net.2`)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    width = x_BxTxD.shape[-1]
    inner = 4 * width
    h = nn.Dense(2 * inner, dtype=self.dtype, name='geglu_proj')(x_BxTxD)
    value, gate = jnp.split(h, 2, axis=-1)
    h = value * nn.gelu(gate, approximate=False)
    return nn.Dense(width, dtype=self.dtype, name='out_proj')(h)


class BasicTransformerBlock(nn.Module):
  """diffusers `BasicTransformerBlock` (layer_norm, default attention):
  x + attn1(norm1(x)); x + attn2(norm2(x), context); x + ff(norm3(x))."""
  heads: int
  upcast_attention: bool = False
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x_BxTxD, context_BxSxE):
    norm = lambda name: nn.LayerNorm(epsilon=TRANSFORMER_LAYER_NORM_EPS,
                                     use_fast_variance=False,
                                     dtype=self.dtype, name=name)
    attention = lambda name: Attention(self.heads, self.upcast_attention,
                                       self.dtype, self.attention, name=name)
    x = x_BxTxD
    x = x + attention('attn1')(norm('norm1')(x))
    x = x + attention('attn2')(norm('norm2')(x), context_BxSxE)
    return x + FeedForward(self.dtype, name='ff')(norm('norm3')(x))


class Transformer2D(nn.Module):
  """diffusers `Transformer2DModel` over continuous inputs: GroupNorm ->
  proj_in -> BasicTransformerBlocks over the H*W tokens -> proj_out ->
  + input."""
  heads: int
  num_layers: int
  groups: int
  upcast_attention: bool = False
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x_BxHxWxC, context_BxSxE):
    batch, height, width, channels = x_BxHxWxC.shape
    h = sd_vae.group_norm(self.groups, TRANSFORMER_GROUP_NORM_EPS, self.dtype,
                          'norm')(x_BxHxWxC)
    h = h.reshape(batch, height * width, channels)
    h = nn.Dense(channels, dtype=self.dtype, name='proj_in')(h)
    for k in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, self.upcast_attention, self.dtype,
                                self.attention,
                                name=f'transformer_blocks_{k}')(
                                    h, context_BxSxE)
    h = nn.Dense(channels, dtype=self.dtype, name='proj_out')(h)
    return x_BxHxWxC + h.reshape(batch, height, width, channels)


class DownBlock(nn.Module):
  """diffusers `CrossAttnDownBlock2D` (`with_attention`) or `DownBlock2D`:
  resnets (each followed by a Transformer2D when `with_attention`), then a
  stride-2 conv unless it is the last block.

  Returns (output, skips): skips are the output of every resnet (+
  transformer) and of the downsampler, in order: diffusers' `res_samples`,
  which the full U-Net's up path (`models/diffusion_unet.py`) concatenates.
  """
  config: UNetConfig
  index: int
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x_BxHxWxC, temb_BxT, context_BxSxE):
    cfg, i = self.config, self.index
    channels = cfg.block_out_channels[i]
    with_attention = cfg.down_block_types[i] == CROSS_ATTN_DOWN_BLOCK
    x = x_BxHxWxC
    skips = []
    for j in range(cfg.layers_per_block[i]):
      x = sd_vae.ResnetBlock2D(channels, cfg.norm_num_groups, cfg.norm_eps,
                               dtype=self.dtype, name=f'resnets_{j}')(
                                   x, temb_BxT)
      if with_attention:
        x = Transformer2D(cfg.num_attention_heads[i],
                          cfg.transformer_layers_per_block[i],
                          cfg.norm_num_groups, cfg.upcast_attention,
                          self.dtype, self.attention, name=f'attentions_{j}')(
                              x, context_BxSxE)
      skips.append(x)
    if i != len(cfg.block_out_channels) - 1:
      x = sd_vae.Downsample2D(channels, cfg.downsample_padding, self.dtype,
                              name='downsamplers_0')(x)
      skips.append(x)
    return x, tuple(skips)


class MidBlock(nn.Module):
  """diffusers `UNetMidBlock2DCrossAttn`: resnet, Transformer2D, resnet."""
  config: UNetConfig
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  @nn.compact
  def __call__(self, x_BxHxWxC, temb_BxT, context_BxSxE):
    cfg = self.config
    resnet = lambda name: sd_vae.ResnetBlock2D(
        cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps,
        cfg.mid_block_scale_factor, self.dtype, name=name)
    x = resnet('resnets_0')(x_BxHxWxC, temb_BxT)
    x = Transformer2D(cfg.num_attention_heads[-1],
                      cfg.transformer_layers_per_block[-1],
                      cfg.norm_num_groups, cfg.upcast_attention, self.dtype,
                      self.attention, name='attentions_0')(x, context_BxSxE)
    return resnet('resnets_1')(x, temb_BxT)


class UNetEncoder(nn.Module):
  """The SD U-Net up to its mid block: (latents, timesteps, context) ->
  mid-block features.

  `__call__` returns the mid block's output [B, H/f, W/f, C_last]
  (f = `config.downsample_factor`); `stages` returns every stage's output,
  {'down_blocks_{i}': ..., 'mid_block': ...} (each down block's output is
  after its downsampler). Inputs: latents [B, H, W, in_channels] (the VAE's
  scaled latents, NHWC; H and W divisible by f), timesteps: a scalar or [B]
  (int or float), context [B, T, cross_attention_dim] (the text encoder's
  hidden states).

  Attributes:
    config: the U-Net's shape.
    dtype: computation dtype (params stay float32; the sinusoidal timestep
      embedding is computed in float32).
    attention: the attention op of every transformer block
      (reverse_sd/ops/attention.py; default: XLA's).
  """
  config: UNetConfig
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  def __call__(self, latents_BxHxWxC, timesteps, context_BxSxE,
               class_labels=None):
    return self.stages(latents_BxHxWxC, timesteps, context_BxSxE,
                       class_labels)['mid_block']

  def stages(self, latents_BxHxWxC, timesteps, context_BxSxE,
             class_labels=None):
    """Every stage's output: {'down_blocks_{i}': ..., 'mid_block': ...}."""
    outputs, _, _ = self.down_path(latents_BxHxWxC, timesteps, context_BxSxE,
                                   class_labels)
    return outputs

  @nn.compact
  def down_path(self, latents_BxHxWxC, timesteps, context_BxSxE,
                class_labels=None):
    """(stages, skips, temb): `stages`' dict, the skip connections the up
    path reads (conv_in's output, then every down block's skips, in order:
    diffusers' `down_block_res_samples`) and the time embedding [B, T] (with
    the class embedding added, when the config has one)."""
    cfg = self.config
    batch = latents_BxHxWxC.shape[0]
    timesteps_B = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_emb = timestep_embedding(timesteps_B, cfg.block_out_channels[0],
                               cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = TimestepEmbedding(cfg.time_embed_dim, self.dtype,
                             name='time_embedding')(t_emb.astype(self.dtype))
    if cfg.projection_class_embeddings_input_dim is not None:
      if class_labels is None:
        class_labels = pooled_context(context_BxSxE)
      expected = (batch, cfg.projection_class_embeddings_input_dim)
      if tuple(class_labels.shape) != expected:
        raise ValueError(f'class_labels have shape {tuple(class_labels.shape)}'
                         f'; the class embedding takes {expected}.')
      temb = temb + TimestepEmbedding(
          cfg.time_embed_dim, self.dtype, name='class_embedding')(
              class_labels.astype(self.dtype))
    pad = (cfg.conv_in_kernel - 1) // 2
    x = nn.Conv(cfg.block_out_channels[0], (cfg.conv_in_kernel,) * 2,
                  padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                  name='conv_in')(latents_BxHxWxC)
    context = context_BxSxE.astype(self.dtype)
    outputs = {}
    skips = [x]
    for i in range(len(cfg.block_out_channels)):
      x, block_skips = DownBlock(cfg, i, self.dtype, self.attention,
                                 name=f'down_blocks_{i}')(x, temb, context)
      outputs[f'down_blocks_{i}'] = x
      skips.extend(block_skips)
    outputs['mid_block'] = MidBlock(cfg, self.dtype, self.attention,
                                    name='mid_block')(
        x, temb, context)
    return outputs, tuple(skips), temb
