"""Hugging Face CLIP vision checkpoints -> the Flax ViT, against transformers.

The fixtures under tests/golden/ (tiny_clip_vision/, tiny_clip_full/,
clip_golden.npz) are written by tools/reference/make_clip_golden.py in the
reference environment (torch + transformers 5). If a parity test fails, check
the mapping table first (transposes, LayerNorm names), then the activation
and LayerNorm eps read from config.json, then the position-embedding resize.

Measured max |Flax - HF| (float32, CPU): pooled and projected outputs
<= 1e-6 at every size; resized position embeddings <= 1e-7 (the resize
re-implements PyTorch's bicubic filter exactly, in float64).
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reverse_sd.convert import clip
from reverse_sd.convert import core
from reverse_sd.models import vit

GOLDEN_DIR = pathlib.Path(__file__).parent / 'golden'
VISION_DIR = GOLDEN_DIR / 'tiny_clip_vision'  # CLIPVisionModelWithProjection.
FULL_DIR = GOLDEN_DIR / 'tiny_clip_full'  # CLIPModel (with a text half).
OUTPUT_ATOL = 1e-4
POS_EMBED_ATOL = 1e-6


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN_DIR / 'clip_golden.npz', allow_pickle=False) as data:
    return {name: data[name] for name in data.files}


@pytest.fixture(scope='module')
def vision_tensors():
  return load_file(str(VISION_DIR / clip.WEIGHTS_FILE))


def _apply(config, params, pixels_NxCxHxW, with_projection):
  model = vit.VisionTransformer(config, use_projection=with_projection)
  images = jnp.asarray(pixels_NxCxHxW).transpose(0, 2, 3, 1)  # NCHW -> NHWC.
  return np.asarray(jax.jit(model.apply)({'params': params}, images))


def _check(actual, expected, atol, what):
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  diff = float(np.abs(actual - expected).max())
  assert diff <= atol, f'{what}: max |Flax - HF| = {diff:.3g} > {atol}'


def _model_dir(tmp_path, tensors, config_source=VISION_DIR, config=None):
  """A model folder with `tensors` and the config of `config_source`."""
  model_dir = tmp_path / 'model'
  model_dir.mkdir()
  if config is None:
    shutil.copy(config_source / clip.CONFIG_FILE, model_dir)
  else:
    (model_dir / clip.CONFIG_FILE).write_text(json.dumps(config))
  if tensors is not None:
    save_file(dict(tensors), str(model_dir / clip.WEIGHTS_FILE))
  return model_dir


# --- Parity with transformers -------------------------------------------------


def test_golden_records_versions(golden):
  versions = json.loads(str(golden['versions_json']))
  assert versions['transformers'].startswith('5.'), versions


@pytest.mark.parametrize('model_dir,name', [(VISION_DIR, 'vision'),
                                            (FULL_DIR, 'full')])
@pytest.mark.parametrize('with_projection', [False, True])
def test_matches_hf_at_checkpoint_size(golden, model_dir, name,
                                       with_projection):
  config, params = clip.load_clip_vision(model_dir,
                                         with_projection=with_projection)
  assert config.image_size == 32
  out = _apply(config, params, golden['pixel_values_32'], with_projection)
  key = 'image_embeds' if with_projection else 'pooler_output'
  _check(out, golden[f'{name}_{key}_32'], OUTPUT_ATOL, f'{name} {key}')


def test_full_config_reads_activation_eps_and_top_level_projection():
  config = clip.read_config(FULL_DIR)
  assert (config.activation, config.layer_norm_eps) == ('gelu', 1e-6)
  # vision_config says 512 (the default); CLIPModel uses the top-level 24.
  assert config.projection_dim == 24
  assert clip.read_config(VISION_DIR) == vit.VARIANTS['tiny']


@pytest.mark.parametrize('size', [48, 24])
def test_resized_position_embeddings_match_hf(golden, vision_tensors, size):
  pos = vision_tensors['vision_model.embeddings.position_embedding.weight']
  grid = size // 8
  resized = clip.resize_position_embedding(pos, (grid, grid))
  _check(resized, golden[f'vision_pos_embed_{size}'], POS_EMBED_ATOL,
         f'position embeddings at {size} px')
  np.testing.assert_array_equal(resized[0], pos[0])  # Class token kept.


@pytest.mark.parametrize('name,size', [('vision', 48), ('vision', 24),
                                       ('full', 48)])
def test_matches_hf_interpolate_pos_encoding(golden, name, size):
  model_dir = VISION_DIR if name == 'vision' else FULL_DIR
  config, params = clip.load_clip_vision(model_dir, image_size=size,
                                         with_projection=True)
  grid = size // 8
  assert config.image_size == size
  assert params['position_embedding'].shape == (1 + grid * grid, 32)
  pixels = golden[f'pixel_values_{size}']
  _check(_apply(config, params, pixels, True),
         golden[f'{name}_image_embeds_{size}'], OUTPUT_ATOL,
         f'{name} image_embeds at {size} px')
  pooled = {k: v for k, v in params.items() if k != 'visual_projection'}
  _check(_apply(config, pooled, pixels, False),
         golden[f'{name}_pooler_output_{size}'], OUTPUT_ATOL,
         f'{name} pooler_output at {size} px')


def test_checkpoint_size_is_not_resized(vision_tensors):
  _, params = clip.load_clip_vision(VISION_DIR, image_size=32)
  np.testing.assert_array_equal(
      params['position_embedding'],
      vision_tensors['vision_model.embeddings.position_embedding.weight'])


# --- Key layouts --------------------------------------------------------------


def test_transformers5_bare_vision_model_layout(tmp_path, golden,
                                                vision_tensors):
  """transformers 5 `CLIPVisionModel` saves the tower without a prefix."""
  bare = {k.removeprefix('vision_model.'): v
          for k, v in vision_tensors.items() if k != clip.PROJECTION_KEY}
  assert sorted(bare) == golden['bare_vision_model_keys'].tolist()
  model_dir = _model_dir(tmp_path, bare)
  config, params = clip.load_clip_vision(model_dir)
  _check(_apply(config, params, golden['pixel_values_32'], False),
         golden['vision_pooler_output_32'], OUTPUT_ATOL, 'bare pooler_output')
  with pytest.raises(core.ConversionError,
                     match=r"missing key 'visual_projection\.weight'"):
    clip.load_clip_vision(model_dir, with_projection=True)


@pytest.mark.parametrize('prefix', ['model.', 'clip.'])
def test_prefixed_checkpoints_convert_identically(tmp_path, vision_tensors,
                                                  prefix):
  _, plain = clip.load_clip_vision(VISION_DIR, with_projection=True)
  model_dir = _model_dir(tmp_path, {prefix + k: v
                                    for k, v in vision_tensors.items()})
  _, prefixed = clip.load_clip_vision(model_dir, with_projection=True)
  jax.tree.map(np.testing.assert_array_equal, plain, prefixed)


def test_full_checkpoint_ignores_only_the_text_half():
  tensors = load_file(str(FULL_DIR / clip.WEIGHTS_FILE))
  config = clip.read_config(FULL_DIR)
  model = vit.VisionTransformer(config, use_projection=True)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3)))['params']
  clip.convert_clip_vision(tensors, abstract, num_layers=2)
  ignored = [k for k in tensors
             if not k.startswith('vision_model.') and
             k != clip.PROJECTION_KEY]
  assert 'logit_scale' in ignored and 'text_projection.weight' in ignored
  assert all(k.startswith('text_model.') for k in ignored
             if k not in ('logit_scale', 'text_projection.weight'))


def test_sharded_checkpoint(tmp_path, vision_tensors):
  model_dir = _model_dir(tmp_path, None)
  keys = sorted(vision_tensors)
  weight_map = {}
  for i, shard_keys in enumerate((keys[:20], keys[20:])):
    name = f'model-0000{i + 1}-of-00002.safetensors'
    save_file({k: vision_tensors[k] for k in shard_keys},
              str(model_dir / name))
    weight_map.update({k: name for k in shard_keys})
  (model_dir / clip.WEIGHTS_INDEX_FILE).write_text(
      json.dumps({'metadata': {}, 'weight_map': weight_map}))
  _, sharded = clip.load_clip_vision(model_dir, with_projection=True)
  _, plain = clip.load_clip_vision(VISION_DIR, with_projection=True)
  jax.tree.map(np.testing.assert_array_equal, plain, sharded)


# --- Bad checkpoints and folders ----------------------------------------------


def test_wrong_shape_names_key_and_both_shapes(tmp_path, vision_tensors):
  key = 'vision_model.encoder.layers.1.mlp.fc1.weight'
  tensors = dict(vision_tensors)
  tensors[key] = np.zeros((63, 32), np.float32)
  model_dir = _model_dir(tmp_path, tensors)
  with pytest.raises(core.ConversionError) as error:
    clip.load_clip_vision(model_dir)
  message = str(error.value)
  assert f'key {key!r} has shape (63, 32)' in message, message
  assert '(64, 32)' in message, message  # Expected source shape.
  assert 'layers_1/fc1/kernel' in message, message
  assert str(model_dir / clip.WEIGHTS_FILE) in message, message


def test_checkpoint_of_another_variant(vision_tensors):
  """Asking for 'small' with 'tiny' files (like B/16 with L/14 files)."""
  config = vit.VARIANTS['small']
  model = vit.VisionTransformer(config, use_projection=True)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 64, 64, 3)))['params']
  with pytest.raises(core.ConversionError) as error:
    clip.convert_clip_vision(vision_tensors, abstract,
                             num_layers=config.layers,
                             source_name='tiny/model.safetensors')
  message = str(error.value)
  assert message.startswith('tiny/model.safetensors: '), message
  assert ('width 32, patch 8 and 2 layers (key '
          "'vision_model.embeddings.patch_embedding.weight' has shape "
          '(32, 3, 8, 8)); the target ViT has width 128, patch 8 and 4 layers '
          '(expected shape (128, 3, 8, 8))') in message, message
  # The per-key list follows.
  assert ("key 'vision_model.pre_layrnorm.weight' has shape (32,); expected "
          'shape (128,)') in message, message


def test_config_that_does_not_fit_the_weights(tmp_path, vision_tensors):
  """config.json says 3 layers of width 48; the files have 2 of width 32."""
  config = json.loads((VISION_DIR / clip.CONFIG_FILE).read_text())
  config.update(hidden_size=48, num_hidden_layers=3)
  model_dir = _model_dir(tmp_path, vision_tensors, config=config)
  with pytest.raises(core.ConversionError) as error:
    clip.load_clip_vision(model_dir)
  message = str(error.value)
  assert str(model_dir / clip.WEIGHTS_FILE) in message, message
  assert '(32, 3, 8, 8)' in message and '(48, 3, 8, 8)' in message, message


def test_position_embeddings_that_do_not_fit_config_image_size(
    tmp_path, vision_tensors):
  config = json.loads((VISION_DIR / clip.CONFIG_FILE).read_text())
  config['image_size'] = 40  # A 5x5 grid; the weights have 4x4.
  model_dir = _model_dir(tmp_path, vision_tensors, config=config)
  with pytest.raises(core.ConversionError) as error:
    clip.load_clip_vision(model_dir)
  message = str(error.value)
  assert ("key 'vision_model.embeddings.position_embedding.weight' has shape "
          '(17, 32)') in message, message
  assert '(26, 32)' in message, message


def test_missing_key_is_named(tmp_path, vision_tensors):
  key = 'vision_model.encoder.layers.0.self_attn.k_proj.bias'
  tensors = {k: v for k, v in vision_tensors.items() if k != key}
  with pytest.raises(core.ConversionError,
                     match=f'missing key {key!r}'.replace('.', r'\.')):
    clip.load_clip_vision(_model_dir(tmp_path, tensors))


@pytest.mark.parametrize('key', [
    'vision_model.encoder.layers.2.mlp.fc1.weight',
    'vision_model.head.weight',
    'classifier.weight',
])
def test_unexpected_key_is_named(tmp_path, vision_tensors, key):
  tensors = dict(vision_tensors)
  tensors[key] = np.zeros((64, 32), np.float32)
  with pytest.raises(core.ConversionError,
                     match=f'unused key {key!r}'.replace('.', r'\.')):
    clip.load_clip_vision(_model_dir(tmp_path, tensors))


def test_unknown_layout_is_named(tmp_path, vision_tensors):
  tensors = {'encoder.' + k: v for k, v in vision_tensors.items()}
  with pytest.raises(core.ConversionError, match='cannot find'):
    clip.load_clip_vision(_model_dir(tmp_path, tensors))


def test_pickled_weights_are_refused(tmp_path):
  model_dir = _model_dir(tmp_path, None)
  (model_dir / 'pytorch_model.bin').write_bytes(b'never unpickled')
  with pytest.raises(FileNotFoundError) as error:
    clip.load_clip_vision(model_dir)
  message = str(error.value)
  assert 'pytorch_model.bin' in message and 'safetensors' in message, message


def test_missing_folder_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='not found'):
    clip.load_clip_vision(tmp_path / 'nowhere')
  model_dir = _model_dir(tmp_path, None)
  with pytest.raises(FileNotFoundError, match=r'no model\.safetensors'):
    clip.load_clip_vision(model_dir)
  (model_dir / clip.CONFIG_FILE).unlink()
  with pytest.raises(FileNotFoundError, match=r'config\.json'):
    clip.load_clip_vision(model_dir)


# --- config.json --------------------------------------------------------------


def test_config_that_is_not_clip(tmp_path, vision_tensors):
  bert = {'model_type': 'bert', 'hidden_size': 384, 'intermediate_size': 1536,
          'num_hidden_layers': 6, 'num_attention_heads': 12}
  model_dir = _model_dir(tmp_path, vision_tensors, config=bert)
  with pytest.raises(ValueError) as error:
    clip.load_clip_vision(model_dir)
  message = str(error.value)
  assert str(model_dir / clip.CONFIG_FILE) in message, message
  assert "model_type 'bert'" in message and "['patch_size']" in message, (
      message)
  with pytest.raises(ValueError, match=r"missing keys \['hidden_size', "
                     r"'intermediate_size'.*'patch_size'\]"):
    clip.vit_config_from_hf({'architectures': ['Foo']}, source_name='x.json')


def test_config_unsupported_activation():
  config = json.loads((VISION_DIR / clip.CONFIG_FILE).read_text())
  config['hidden_act'] = 'gelu_new'
  with pytest.raises(ValueError, match="hidden_act 'gelu_new'"):
    clip.vit_config_from_hf(config)


# vision_config of the real checkpoints' config.json (the keys that matter).
_HF_VISION_CONFIGS = {
    'B/16': dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, patch_size=16, image_size=224,
                 hidden_act='quick_gelu', layer_norm_eps=1e-5,
                 model_type='clip_vision_model'),
    'L/14': dict(hidden_size=1024, intermediate_size=4096,
                 num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                 image_size=224, hidden_act='quick_gelu', layer_norm_eps=1e-5,
                 model_type='clip_vision_model'),
    'H/14': dict(hidden_size=1280, intermediate_size=5120,
                 num_hidden_layers=32, num_attention_heads=16, patch_size=14,
                 image_size=224, hidden_act='gelu', layer_norm_eps=1e-5,
                 model_type='clip_vision_model'),
}
_PROJECTION_DIMS = {'B/16': 512, 'L/14': 768, 'H/14': 1024}


@pytest.mark.parametrize('variant', sorted(_HF_VISION_CONFIGS))
def test_hf_configs_give_the_project_variants(variant):
  vision = _HF_VISION_CONFIGS[variant]
  projection_dim = _PROJECTION_DIMS[variant]
  full = {'model_type': 'clip', 'projection_dim': projection_dim,
          'text_config': {'hidden_size': 512},
          'vision_config': {**vision, 'projection_dim': 512}}
  vision_only = {**vision, 'projection_dim': projection_dim,
                 'architectures': ['CLIPVisionModelWithProjection']}
  for config_json in (full, vision_only):
    assert clip.vit_config_from_hf(config_json) == vit.VARIANTS[variant]
  config = vit.VARIANTS[variant]
  model = vit.VisionTransformer(config, use_projection=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))['params']
  p, d = config.patch_size, config.width
  assert shapes['patch_embedding']['kernel'].shape == (p, p, 3, d)
  assert shapes['position_embedding'].shape == ((224 // p)**2 + 1, d)
  assert shapes['visual_projection']['kernel'].shape == (d, projection_dim)
  assert f'layers_{config.layers - 1}' in shapes


# --- Pieces -------------------------------------------------------------------


def test_resize_position_embedding_shapes():
  pos = np.random.default_rng(0).standard_normal((17, 5)).astype(np.float32)
  assert clip.resize_position_embedding(pos, (4, 4)) is pos
  resized = clip.resize_position_embedding(pos, (3, 7))
  assert resized.shape == (22, 5) and resized.dtype == np.float32
  with pytest.raises(ValueError, match='square grid'):
    clip.resize_position_embedding(pos[:16], (3, 3))
  # Each output pixel is a weighted sum with weights summing to one.
  for size_in, size_out in [(4, 6), (6, 3), (16, 37)]:
    np.testing.assert_allclose(
        clip.bicubic_matrix(size_in, size_out).sum(axis=1), 1.0, atol=1e-12)


def test_projection_is_optional_and_off_by_default():
  config = vit.VARIANTS['tiny']
  images = jnp.zeros((2, 32, 32, 3))
  plain = vit.VisionTransformer(config)
  shapes = jax.eval_shape(plain.init, jax.random.key(0), images)['params']
  assert 'visual_projection' not in shapes
  projected = vit.VisionTransformer(config, use_projection=True)
  params = projected.init(jax.random.key(0), images)
  assert params['params']['visual_projection']['kernel'].shape == (32, 16)
  assert projected.apply(params, images).shape == (2, 16)


def _write_bf16_safetensors(path, tensors):
  """The safetensors layout by hand: safetensors.numpy cannot write bf16."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  header, chunks, offset = {}, [], 0
  for key in sorted(tensors):
    data = np.asarray(tensors[key], np.float32).astype(
        ml_dtypes.bfloat16).tobytes()
    header[key] = {'dtype': 'BF16', 'shape': list(tensors[key].shape),
                   'data_offsets': [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  encoded = json.dumps(header).encode()
  path.write_bytes(len(encoded).to_bytes(8, 'little') + encoded +
                   b''.join(chunks))


def test_bfloat16_checkpoint_loads_upcast(tmp_path):
  model_dir = tmp_path / 'bf16'
  model_dir.mkdir()
  shutil.copy(VISION_DIR / 'config.json', model_dir / 'config.json')
  _write_bf16_safetensors(model_dir / 'model.safetensors',
                          load_file(VISION_DIR / 'model.safetensors'))
  _, params32 = clip.load_clip_vision(VISION_DIR, with_projection=True)
  _, params16 = clip.load_clip_vision(model_dir, with_projection=True)
  for a, b in zip(jax.tree.leaves(params32), jax.tree.leaves(params16)):
    assert b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
