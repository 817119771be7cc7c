"""The black-box reverse model: image backbone + head to the prompt embedding."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from reverse_sd.models import convnet
from reverse_sd.models import heads
from reverse_sd.models import resnet
from reverse_sd.models import vit

BACKBONES = {
    'clip_resnet': (resnet.ResNet, resnet.VARIANTS),
    'convnet': (convnet.ConvNet, convnet.VARIANTS),
    'vit': (vit.VisionTransformer, vit.VARIANTS),
}


class ReverseModel(nn.Module):
  """uint8 images [B,H,W,3] -> dict(embedding [B,384] unit norm, features).

  Given `features` (a frozen backbone's cached output) instead of images, the
  backbone is skipped and only the head (and vocabulary head) run.

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
  def __call__(self, images_BxHxWx3=None, *, features=None):
    if (images_BxHxWx3 is None) == (features is None):
      raise ValueError('Pass exactly one of images and features.')
    if features is None:
      features = self.extract_features(images_BxHxWx3)
    else:
      features = features.astype(self.dtype)
    out = {'embedding': self.head(features), 'features': features}
    if self.vocab_size:
      source = out['embedding' if self.vocab_head_input == 'embedding'
                   else 'features']
      out['word_logits'] = nn.Dense(self.vocab_size, dtype=jnp.float32,
                                    name='vocab_head')(
                                        source.astype(jnp.float32))
    return out

  def extract_features(self, images_BxHxWx3):
    """The backbone's output for uint8 images (normalised here)."""
    mean = jnp.asarray(self.image_mean, jnp.float32) * 255.0
    std = jnp.asarray(self.image_std, jnp.float32) * 255.0
    x = (images_BxHxWx3.astype(jnp.float32) - mean) / std
    return self.backbone(x.astype(self.dtype))


def create_model(model_config: ml_collections.ConfigDict,
                 embedding_dim: int = 384, *, vocab_size: int = 0,
                 vocab_head_input: str = 'embedding') -> ReverseModel:
  """Builds the model named by `config.model` with clear errors on typos."""
  if model_config.backbone not in BACKBONES:
    raise ValueError(f'config.model.backbone={model_config.backbone!r}; '
                     f'expected one of {sorted(BACKBONES)}.')
  module_cls, variants = BACKBONES[model_config.backbone]
  if model_config.variant not in variants:
    raise ValueError(f'config.model.variant={model_config.variant!r} is not a '
                     f'{model_config.backbone} variant; expected one of '
                     f'{sorted(variants)}.')
  try:
    dtype = jnp.dtype(model_config.dtype)
  except TypeError as e:
    raise ValueError(f'config.model.dtype={model_config.dtype!r} is not a '
                     'dtype name (e.g. float32, bfloat16).') from e
  if vocab_head_input not in ('embedding', 'features'):
    raise ValueError(f'config.vocab.head_input={vocab_head_input!r}; expected '
                     "'embedding' or 'features'.")
  extra = {}
  if model_config.get('vit_projection', False):
    if model_config.backbone != 'vit':
      raise ValueError('config.model.vit_projection=True needs backbone '
                       f"'vit', not {model_config.backbone!r}.")
    extra['use_projection'] = True
  backbone = module_cls(variants[model_config.variant], dtype=dtype,
                        name='backbone', **extra)
  head = heads.EmbeddingHead(embedding_dim, tuple(model_config.head_hidden),
                             dtype=dtype, name='head')
  return ReverseModel(backbone, head, tuple(model_config.image_mean),
                      tuple(model_config.image_std), dtype=dtype,
                      vocab_size=vocab_size,
                      vocab_head_input=vocab_head_input)
