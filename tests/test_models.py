"""Model output shapes, normalisation and named shapes."""

from clu import parameter_overview
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from reverse_sd.models import reverse_model
from reverse_sd.models import vit


def _model(backbone, variant, **overrides):
  config = synthetic.get_config()
  with config.unlocked():
    config.model.backbone = backbone
    config.model.variant = variant
    for key, value in overrides.items():
      config.model[key] = value
  return reverse_model.create_model(config.model)


# The 'small' variants differ from 'tiny' only in widths and depth; the ViT's
# also in its patch grid. (The CLIP-ResNet's compile alone is ~30 s here.)
@pytest.mark.parametrize('backbone,variant,size', [
    ('convnet', 'tiny', 32), ('clip_resnet', 'tiny', 32), ('vit', 'tiny', 32),
    ('vit', 'small', 64)])
def test_output_shape_and_unit_norm(backbone, variant, size):
  model = _model(backbone, variant)
  images = jax.random.randint(jax.random.key(0), (3, size, size, 3), 0, 256,
                              jnp.int32).astype(jnp.uint8)
  # Jitted: one compile each instead of one per op (minutes for the
  # CLIP-ResNet on 2 shared cores).
  params = jax.jit(model.init)(jax.random.key(1), images)
  out = jax.jit(model.apply)(params, images)
  assert out['embedding'].shape == (3, 384)
  assert out['embedding'].dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(out['embedding'], axis=-1), 1.0,
                             atol=1e-5)
  # Different images give different embeddings (the head is not constant).
  assert float(jnp.abs(out['embedding'][0] - out['embedding'][1]).max()) > 1e-4


def test_bfloat16_compute_keeps_float32_params():
  model = _model('convnet', 'tiny', dtype='bfloat16')
  images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  params = model.init(jax.random.key(0), images)
  dtypes = {x.dtype for x in jax.tree.leaves(params)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  out = model.apply(params, images)
  assert out['embedding'].dtype == jnp.float32
  assert out['features'].dtype == jnp.bfloat16


def test_clip_vit_b16_has_clip_parameter_count():
  # OpenAI CLIP ViT-B/16's vision tower (without its projection) has 85.8M
  # parameters at 224 px.
  model = _model('vit', 'B/16')
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3), jnp.uint8))
  backbone = parameter_overview.count_parameters(
      shapes['params']['backbone'])
  assert 85.7e6 < backbone < 85.9e6, backbone


@pytest.mark.parametrize('field,value', [('backbone', 'resnet9'),
                                         ('variant', 'B/99'),
                                         ('dtype', 'float99')])
def test_bad_model_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f'config.model.{field}'):
    _model(**{'backbone': 'vit', 'variant': 'tiny', field: value})


def test_vit_variants_are_the_clip_shapes():
  assert vit.VARIANTS['L/14'].width == 1024 and vit.VARIANTS['L/14'].layers == 24
  assert vit.VARIANTS['H/14'].width == 1280 and vit.VARIANTS['H/14'].layers == 32


def test_encoder_layer_query_tokens_equal_the_full_layer_rows():
  """The vision tower's last layer updates only the class token; that row
  equals the full layer's first row, and the parameters are the same."""
  cfg = vit.ViTConfig(width=32, layers=1, heads=4, mlp_dim=64, patch_size=4)
  layer = vit.EncoderLayer(cfg)
  x = jax.random.normal(jax.random.key(0), (3, 9, 32))
  params = layer.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, layer.init(
      jax.random.key(1), x, query_tokens=1)) == jax.tree.map(jnp.shape, params)
  full = layer.apply(params, x)
  first = layer.apply(params, x, query_tokens=1)
  assert first.shape == (3, 1, 32)
  np.testing.assert_allclose(first, full[:, :1], rtol=1e-5, atol=1e-6)
