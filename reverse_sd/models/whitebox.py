"""The paper's white-box reverse backbone: the Stable Diffusion U-Net encoder.

Images in [-1, 1] -> the SD VAE's latent mean x scaling factor (the frozen
stage: it never trains, so `config.model.frozen_features=True` caches it once
per data set) -> the U-Net's down blocks and mid block at timestep
`config.model.sd_timestep` (0: the clean latent) with a fixed cross-attention
context -> the mid block's output max-pooled over space, [B, C_last]. The
project's `EmbeddingHead` maps that to the 384-d unit-norm prompt embedding.

Parameters live under `backbone/vae/...` (the `VAEEncoder`'s, frozen) and
`backbone/unet/...` (the `UNetEncoder`'s, fine-tuned). The context is not a
parameter; it is a constant of the module, or (kind 'caption') an input:

  'empty'  the generator's own text encoder on the empty prompt
           (`reverse_sd.text.sd_context`, read from `config.model.init_from`),
           what SD conditions on for unconditional guidance;
  'file'   a float [T, D] .npy at `config.model.sd_context_path` (e.g. a
           precomputed context of another prompt);
  'zeros'  an all-zero [77, D] context (shape checks, ablations).
  'caption' per example, the SD text encoder on that example's own prompt
           (`pipe.encode_prompt(prompt)`), computed once per split and
           cached (`feature_cache.attach_caption_contexts`); batches carry it
           as 'context' [B, 77, D] and `__call__` takes it as `context`.
           The model is then shown the prompt it is asked to predict: an
           upper bound for analysis, not a reverse model, and it cannot
           predict new images (they have no prompt).

With `config.model.sd_noise` > 0 the latent is noised as DDPM's forward
process does at `sd_timestep`, scaled by `sd_noise`:
  z_t = sqrt(alpha_bar_t) z_0 + sd_noise sqrt(1 - alpha_bar_t) eps,
with SD's training schedule (scaled_linear betas 0.00085..0.012, 1000 steps).
Noise is drawn from the 'noise' rng when the caller passes one (the train
step does, per step), else from a fixed key (evaluation stays deterministic).

Shapes come from `config.model.init_from` (a diffusers SD pipeline folder)
when it is set, else from the named variant ('sd1.5', 'sd2.1'). Variant
'from_weights' takes whatever the folder holds (e.g. the tiny test folder);
a named variant must match the folder. This module reads no file:
`reverse_sd.pretrained` reads the shapes, the context and the weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reverse_sd.models import sd_unet
from reverse_sd.models import sd_vae
from reverse_sd.ops import attention as attention_ops

FROM_WEIGHTS = 'from_weights'
VARIANTS = {
    'sd1.5': (sd_unet.VARIANTS['sd1.5'], sd_vae.SD_VAE),
    'sd2.1': (sd_unet.VARIANTS['sd2.1'], sd_vae.SD_VAE),
}
# Regex (over '/'-joined parameter paths) of the frozen VAE.
VAE_PARAMS = '^backbone/vae/'
VAE_SUBFOLDER = 'vae'
# The kind whose context is a per-example input, not a module constant.
CAPTION = 'caption'
CONTEXT_KINDS = ('empty', 'file', 'zeros', CAPTION)
# CLIP's text length: the context SD pipelines feed the U-Net.
CONTEXT_LENGTH = 77
# SD 1.x / 2.x training schedule (diffusers DDPMScheduler, scaled_linear).
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


class Constant:
  """A numpy array held as a module attribute.

  Compared and hashed by identity, so a Flax module holding it stays a
  hashable dataclass; it is baked into the compiled step as a constant.
  """

  def __init__(self, array: np.ndarray):
    self.array = np.array(array, np.float32)
    self.array.flags.writeable = False

  @property
  def shape(self) -> tuple[int, ...]:
    return self.array.shape

  def __repr__(self) -> str:
    return f'Constant(shape={self.array.shape})'


def alphas_cumprod() -> np.ndarray:
  """alpha_bar_t of SD's scaled_linear DDPM schedule, t = 0 .. 999."""
  betas = np.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS,
                      dtype=np.float64)**2
  return np.cumprod(1.0 - betas)


class WhiteBoxBackbone(nn.Module):
  """SD VAE latents -> U-Net down + mid blocks -> max over space, [B, C].

  `frozen_stage(images)` (= `latents`) and `trainable_stage(latents)`
  (= `__call__`) split the backbone where `ReverseModel` caches features.

  Attributes:
    unet_config: the U-Net's shape.
    vae_config: the VAE encoder's shape.
    context: the cross-attention context [T, cross_attention_dim], or None
      when every call passes a per-example context (sd_context='caption').
    caption_encoder_dir: with context None, the SD folder whose text encoder
      makes the per-example contexts (for callers that must compute them).
    timestep: the U-Net's timestep (0: clean latent).
    noise_level: scales the DDPM forward-process noise (0: none).
    dtype: the U-Net's compute dtype. The VAE always runs in float32 (SD
      VAEs overflow in float16; diffusers' `force_upcast`).
    attention: the attention op of the U-Net and the VAE
      (reverse_sd/ops/attention.py).
  """
  unet_config: sd_unet.UNetConfig
  vae_config: sd_vae.VAEConfig
  context: Constant | None
  caption_encoder_dir: str = ''
  timestep: int = 0
  noise_level: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention: attention_ops.Attention = attention_ops.Attention()

  def setup(self):
    if not 0 <= self.timestep < NUM_TRAIN_TIMESTEPS:
      raise ValueError(f'config.model.sd_timestep={self.timestep}; expected '
                       f'an integer in [0, {NUM_TRAIN_TIMESTEPS}).')
    if self.noise_level < 0:
      raise ValueError(f'config.model.sd_noise={self.noise_level}; expected '
                       '>= 0.')
    expected = self.unet_config.cross_attention_dim
    if self.context is not None and (len(self.context.shape) != 2 or
                                     self.context.shape[1] != expected):
      raise ValueError(f'The U-Net context has shape {self.context.shape}; '
                       f'expected [T, {expected}] (cross_attention_dim).')
    if self.vae_config.latent_channels != self.unet_config.in_channels:
      raise ValueError(
          f'The VAE makes {self.vae_config.latent_channels}-channel latents '
          f'but the U-Net takes {self.unet_config.in_channels} channels.')
    self.vae = sd_vae.VAEEncoder(self.vae_config, dtype=jnp.float32,
                                 attention=self.attention)
    self.unet = sd_unet.UNetEncoder(self.unet_config, dtype=self.dtype,
                                    attention=self.attention)

  def latents(self, images_BxHxWx3):
    """Scaled VAE latent means [B, H/8, W/8, 4] of images in [-1, 1].

    No gradient flows into the VAE: it is the frozen stage.
    """
    factor = self.vae_config.downsample_factor * (
        self.unet_config.downsample_factor)
    height, width = images_BxHxWx3.shape[1:3]
    if height % factor or width % factor:
      raise ValueError(
          f'The white-box backbone needs image sides divisible by {factor} '
          f'(VAE x U-Net downsampling); got {height}x{width}. Set '
          'config.data.input_size to a multiple of it.')
    latents = self.vae.latents(images_BxHxWx3.astype(jnp.float32))
    return jax.lax.stop_gradient(latents)

  def __call__(self, latents_BxHxWxC, context=None):
    """Mid-block features, max-pooled over space: [B, C_last].

    Args:
      latents_BxHxWxC: scaled VAE latents.
      context: optional per-example cross-attention context [B, T, D]
        (D: cross_attention_dim); it replaces the module's constant. Needed
        when the module has none (sd_context='caption').
    """
    factor = self.unet_config.downsample_factor
    if (latents_BxHxWxC.ndim != 4 or
        latents_BxHxWxC.shape[-1] != self.unet_config.in_channels or
        latents_BxHxWxC.shape[1] % factor or latents_BxHxWxC.shape[2] % factor):
      raise ValueError(
          f'The U-Net takes latents [B, H, W, {self.unet_config.in_channels}]'
          f' with H and W divisible by {factor}; got shape '
          f'{tuple(latents_BxHxWxC.shape)}.')
    latents = self._add_noise(latents_BxHxWxC.astype(jnp.float32))
    context = self._context(latents.shape[0], context)
    features = self.unet(latents.astype(self.dtype), self.timestep,
                         context.astype(self.dtype))
    return jnp.max(features, axis=(1, 2))

  def frozen_stage(self, images_BxHxWx3):
    return self.latents(images_BxHxWx3)

  def trainable_stage(self, latents_BxHxWxC, context=None):
    return self(latents_BxHxWxC, context)

  def _context(self, batch: int, context_BxTxD):
    """The [B, T, D] context of this call: the per-example one, else the
    module's constant broadcast over the batch."""
    dim = self.unet_config.cross_attention_dim
    if context_BxTxD is None:
      if self.context is not None:
        return jnp.broadcast_to(jnp.asarray(self.context.array),
                                (batch, *self.context.shape))
      if self.is_initializing():
        # Parameter shapes do not depend on the context's values.
        return jnp.zeros((batch, CONTEXT_LENGTH, dim), jnp.float32)
      raise ValueError(
          f"config.model.sd_context='{CAPTION}' reads each example's "
          f'context from the batch (\'context\' [B, {CONTEXT_LENGTH}, {dim}],'
          ' the SD text encoder on its prompt), but none was passed. Attach '
          'the contexts to the splits (feature_cache.attach_caption_contexts)'
          ' or pass context= to the model.')
    if (context_BxTxD.ndim != 3 or context_BxTxD.shape[0] != batch or
        context_BxTxD.shape[2] != dim):
      raise ValueError(
          f'The per-example U-Net context has shape '
          f'{tuple(context_BxTxD.shape)}; expected [{batch}, T, {dim}] '
          '(batch, tokens, cross_attention_dim).')
    return context_BxTxD

  def _add_noise(self, latents):
    if self.noise_level == 0:
      return latents
    alpha_bar = float(alphas_cumprod()[self.timestep])
    key = (self.make_rng('noise') if self.has_rng('noise')
           else jax.random.key(0))
    noise = jax.random.normal(key, latents.shape, jnp.float32)
    return (np.sqrt(alpha_bar) * latents +
            self.noise_level * np.sqrt(1.0 - alpha_bar) * noise)


# --- Building from config.model -----------------------------------------------


def create_backbone(model_config, dtype, name: str = 'backbone',
                    attention: attention_ops.Attention = attention_ops.Attention(),
                    *, unet_config: sd_unet.UNetConfig,
                    vae_config: sd_vae.VAEConfig,
                    context: np.ndarray | None) -> WhiteBoxBackbone:
  """The white-box backbone `config.model` describes, its attention run by
  `attention`.

  The shapes and the context come loaded (`reverse_sd.pretrained.read_configs`
  and `load_context` read them from the SD folder); `context` None means
  sd_context='caption' (a per-example input).
  """
  return WhiteBoxBackbone(
      unet_config, vae_config,
      None if context is None else Constant(context),
      caption_encoder_dir=('' if context is not None else
                           str(model_config.init_from)),
      timestep=int(model_config.get('sd_timestep', 0)),
      noise_level=float(model_config.get('sd_noise', 0.0)), dtype=dtype,
      attention=attention, name=name)
