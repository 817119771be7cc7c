"""The reverse model: image backbone + head to the prompt embedding.

Backbones: the black-box towers ('convnet', 'clip_resnet', 'vit') and the
paper's white-box 'sd_unet' (`whitebox.WhiteBoxBackbone`: SD VAE latents ->
U-Net encoder).
"""

from collections.abc import Sequence
import pathlib

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from reverse_sd.models import convnet
from reverse_sd.models import heads
from reverse_sd.models import resnet
from reverse_sd.models import vit
from reverse_sd.models import whitebox
from reverse_sd.ops import attention as attention_ops
from reverse_sd.ops import conv as conv_ops
from reverse_sd.ops import platform as ops_platform

BACKBONES = {
    'clip_resnet': (resnet.ResNet, resnet.VARIANTS),
    'convnet': (convnet.ConvNet, convnet.VARIANTS),
    'vit': (vit.VisionTransformer, vit.VARIANTS),
}
# Built by `whitebox.create_backbone` from `whitebox_parts` (shapes and
# context that `reverse_sd.pretrained.create_model` reads).
WHITEBOX = 'sd_unet'


class ReverseModel(nn.Module):
  """uint8 images [B,H,W,3] -> dict(embedding [B,384] unit norm, features).

  A backbone may split into a frozen and a trainable stage by defining
  `frozen_stage(x)` and `trainable_stage(z)` (the white-box backbone: VAE
  latents, then the U-Net); otherwise the whole backbone is the frozen stage
  and the trainable stage is the identity. `extract_features` runs the frozen
  stage (what `config.model.frozen_features` caches); given `features` (that
  cached output) instead of images, the frozen stage is skipped and only the
  trainable stage, the head (and vocabulary head) run. The output's
  'features' are the head's input. `context` (a per-example [B, T, D]
  cross-attention context, sd_context='caption') goes to the white-box
  trainable stage.

  With `vocab_size` > 0 the dict also has `word_logits` [B, vocab_size], from
  a Dense layer on the predicted embedding (the paper's choice) or on the
  backbone features (`vocab_head_input='features'`).
  """
  backbone: nn.Module
  head: nn.Module
  image_mean: Sequence[float]
  image_std: Sequence[float]
  dtype: jnp.dtype = jnp.float32
  vocab_size: int = 0
  vocab_head_input: str = 'embedding'

  @nn.compact
  def __call__(self, images_BxHxWx3=None, *, features=None, context=None):
    if (images_BxHxWx3 is None) == (features is None):
      raise ValueError('Pass exactly one of images and features.')
    if features is None:
      features = self.extract_features(images_BxHxWx3)
    features = self.trainable_stage(features.astype(self.dtype), context)
    out = {'embedding': self.head(features), 'features': features}
    if self.vocab_size:
      source = out['embedding' if self.vocab_head_input == 'embedding'
                   else 'features']
      out['word_logits'] = nn.Dense(self.vocab_size, dtype=jnp.float32,
                                    name='vocab_head')(
                                        source.astype(jnp.float32))
    return out

  def extract_features(self, images_BxHxWx3):
    """The backbone's frozen stage for uint8 images (normalised here)."""
    mean = jnp.asarray(self.image_mean, jnp.float32) * 255.0
    std = jnp.asarray(self.image_std, jnp.float32) * 255.0
    x = (images_BxHxWx3.astype(jnp.float32) - mean) / std
    stage = getattr(self.backbone, 'frozen_stage', None)
    if stage is None:
      return self.backbone(x.astype(self.dtype))
    return stage(x)

  def trainable_stage(self, features, context=None):
    """The backbone's trainable stage on frozen-stage outputs (or identity)."""
    stage = getattr(self.backbone, 'trainable_stage', None)
    if context is not None:
      if not isinstance(self.backbone, whitebox.WhiteBoxBackbone):
        raise ValueError('A per-example context is read only by the '
                         f"white-box backbone '{WHITEBOX}' "
                         "(config.model.sd_context='caption').")
      return stage(features, context)
    return features if stage is None else stage(features)


def frozen_param_groups(model_config: ml_collections.ConfigDict
                        ) -> tuple[tuple[str, float], ...]:
  """Optimiser groups (regex, 0.0) of the parameters that never train.

  The white-box VAE always (the U-Net reads its latents as they are); any
  other backbone when `frozen_features` caches it.
  """
  if model_config.backbone == WHITEBOX:
    return ((whitebox.VAE_PARAMS, 0.0),)
  if model_config.frozen_features:
    return (('^backbone/', 0.0),)
  return ()


def frozen_stage_weights(model_config: ml_collections.ConfigDict) -> str:
  """The pretrained weights the cached frozen-stage outputs depend on."""
  if model_config.backbone == WHITEBOX and model_config.init_from:
    return str(pathlib.Path(model_config.init_from) / whitebox.VAE_SUBFOLDER)
  return model_config.init_from


def compute_dtype(model_config: ml_collections.ConfigDict,
                  platform: str | None = None) -> jnp.dtype:
  """`config.model.dtype` as a dtype; 'auto' is bfloat16 on accelerators
  (GPU, TPU) and float32 on CPU. Parameters and optimiser state stay float32
  either way."""
  return ops_platform.compute_dtype(model_config.get('dtype', 'auto'),
                                    platform)


def create_model(model_config: ml_collections.ConfigDict,
                 embedding_dim: int = 384, *, vocab_size: int = 0,
                 vocab_head_input: str = 'embedding', mesh=None,
                 platform: str | None = None,
                 whitebox_parts: tuple | None = None) -> ReverseModel:
  """Builds the model named by `config.model` with clear errors on typos.

  The ops' implementations are chosen here, once (reverse_sd/ops/):
  `config.model.attention` and `config.model.conv` ('auto' or a name) for
  `platform` (default: JAX's default backend; pass 'tpu' or 'cuda' to build
  a model to lower for that platform from another host). `mesh`, the mesh
  the model runs on, lets a fused kernel run under `shard_map`.

  The white-box backbone needs `whitebox_parts` = (unet_config, vae_config,
  context or None), read from its SD folder by
  `reverse_sd.pretrained.create_model`, which callers use for any backbone.
  """
  if model_config.backbone not in (*BACKBONES, WHITEBOX):
    raise ValueError(f'config.model.backbone={model_config.backbone!r}; '
                     f'expected one of {sorted([*BACKBONES, WHITEBOX])}.')
  if model_config.backbone in BACKBONES:
    module_cls, variants = BACKBONES[model_config.backbone]
    if model_config.variant not in variants:
      raise ValueError(f'config.model.variant={model_config.variant!r} is not '
                       f'a {model_config.backbone} variant; expected one of '
                       f'{sorted(variants)}.')
  dtype = compute_dtype(model_config, platform)
  if vocab_head_input not in ('embedding', 'features'):
    raise ValueError(f'config.vocab.head_input={vocab_head_input!r}; expected '
                     "'embedding' or 'features'.")
  extra = {}
  attention = attention_ops.choose(model_config.get('attention', 'auto'),
                                   platform, mesh)
  if model_config.backbone in ('convnet', 'clip_resnet'):
    extra['conv'] = conv_ops.choose(model_config.get('conv', 'auto'),
                                    platform, mesh)
  if model_config.backbone in ('vit', 'clip_resnet'):
    extra['attention'] = attention
  if model_config.get('vit_projection', False):
    if model_config.backbone != 'vit':
      raise ValueError('config.model.vit_projection=True needs backbone '
                       f"'vit', not {model_config.backbone!r}.")
    extra['use_projection'] = True
  if model_config.backbone == WHITEBOX:
    if whitebox_parts is None:
      raise ValueError(
          f"config.model.backbone='{WHITEBOX}' reads its shapes and context "
          'from the SD folder: build it with reverse_sd.pretrained'
          '.create_model, or pass whitebox_parts=(unet_config, vae_config, '
          'context).')
    unet_config, vae_config, context = whitebox_parts
    backbone = whitebox.create_backbone(
        model_config, dtype, name='backbone', attention=attention,
        unet_config=unet_config, vae_config=vae_config, context=context)
  else:
    backbone = module_cls(variants[model_config.variant], dtype=dtype,
                          name='backbone', **extra)
  head = heads.EmbeddingHead(embedding_dim, tuple(model_config.head_hidden),
                             dtype=dtype, name='head')
  return ReverseModel(backbone, head, tuple(model_config.image_mean),
                      tuple(model_config.image_std), dtype=dtype,
                      vocab_size=vocab_size,
                      vocab_head_input=vocab_head_input)
