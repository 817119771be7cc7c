"""diffusers SD U-Net and VAE encoders -> the Flax ports, against diffusers.

The fixtures under tests/golden/ (tiny_sd/{unet,vae}/, tiny_sd2/unet/,
sd_golden.npz) are written by tools/reference/make_sd_golden.py in the
reference environment (torch + diffusers 0.42). If a parity test fails,
check the mapping table first (norm1/norm2, to_k/to_v, proj_in/proj_out),
then the head count read from `attention_head_dim`, then the timestep
embedding (`flip_sin_to_cos`, `freq_shift`) and the downsample padding (VAE
pads right/bottom only, the U-Net every side).

Measured max |Flax - diffusers| (float32, CPU): VAE mean / logvar <= 2e-6;
U-Net stages (down_blocks_0, down_blocks_1, mid_block) <= 4e-6 (SD1-style)
and <= 9e-6 (SD2-style, t = 999) for outputs of magnitude ~4.
"""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reverse_sd.convert import core
from reverse_sd.convert import sd
from reverse_sd.models import sd_unet
from reverse_sd.models import sd_vae

GOLDEN_DIR = pathlib.Path(__file__).parent / 'golden'
SD1_DIR = GOLDEN_DIR / 'tiny_sd'  # unet/ (SD 1.x style) and vae/.
SD2_DIR = GOLDEN_DIR / 'tiny_sd2'  # unet/ (SD 2.x style).
WEIGHTS = 'diffusion_pytorch_model.safetensors'
ATOL = 1e-4


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN_DIR / 'sd_golden.npz', allow_pickle=False) as data:
    return {name: data[name] for name in data.files}


def _nhwc(x_NCHW):
  return jnp.asarray(x_NCHW).transpose(0, 2, 3, 1)


def _check(actual_NHWC, expected_NCHW, what):
  actual = np.asarray(actual_NHWC).transpose(0, 3, 1, 2)
  assert actual.shape == expected_NCHW.shape, (
      what, actual.shape, expected_NCHW.shape)
  diff = float(np.abs(actual - expected_NCHW).max())
  assert diff <= ATOL, f'{what}: max |Flax - diffusers| = {diff:.3g} > {ATOL}'


def _copy_sd_dir(tmp_path, source=SD1_DIR, tensors=None, sub='unet'):
  """A copy of a tiny SD folder, with `tensors` as `sub`'s weights."""
  sd_dir = tmp_path / 'sd'
  shutil.copytree(source, sd_dir)
  if tensors is not None:
    save_file(dict(tensors), str(sd_dir / sub / WEIGHTS))
  return sd_dir


def _tensors(source=SD1_DIR, sub='unet'):
  return load_file(str(source / sub / WEIGHTS))


# --- Parity with diffusers ----------------------------------------------------


def test_golden_records_versions(golden):
  versions = json.loads(str(golden['versions_json']))
  assert versions['diffusers'].startswith('0.42'), versions


def test_vae_matches_diffusers(golden):
  config, params = sd.load_vae_encoder(SD1_DIR)
  assert config.scaling_factor == pytest.approx(
      float(golden['vae_scaling_factor']))
  model = sd_vae.VAEEncoder(config)
  images = _nhwc(golden['vae_images'])
  mean, logvar = jax.jit(model.apply)({'params': params}, images)
  _check(mean, golden['vae_mean'], 'VAE latent mean')
  _check(logvar, golden['vae_logvar'], 'VAE latent logvar')
  latents = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, method=sd_vae.VAEEncoder.latents))(params, images)
  np.testing.assert_allclose(latents, mean * 0.18215, rtol=1e-6)


@pytest.mark.parametrize('name,sd_dir', [('sd1', SD1_DIR), ('sd2', SD2_DIR)])
def test_unet_stages_match_diffusers(golden, name, sd_dir):
  config, params = sd.load_unet_encoder(sd_dir)
  model = sd_unet.UNetEncoder(config)
  stages = jax.jit(lambda p, x, t, c: model.apply(
      {'params': p}, x, t, c, method=sd_unet.UNetEncoder.stages))
  latents = _nhwc(golden[f'{name}_latents'])
  context = jnp.asarray(golden[f'{name}_context'])
  for case in ('a', 'b'):  # Timesteps [0, 0] and [999, 417].
    out = stages(params, latents, golden[f'{name}_timesteps_{case}'],
                 context)
    assert sorted(out) == ['down_blocks_0', 'down_blocks_1', 'mid_block']
    for stage, value in out.items():
      _check(value, golden[f'{name}_{case}_{stage}'],
             f'{name} timesteps {case} {stage}')
  # __call__ is the mid block; a scalar timestep broadcasts over the batch.
  mid = jax.jit(model.apply)({'params': params}, latents, 0, context)
  _check(mid, golden[f'{name}_a_mid_block'], f'{name} __call__')


# --- Full-size layouts (shapes only; no weights exist here) -------------------


def _zero_strided(shapes_json):
  """Read-only float32 arrays of the checkpoint's shapes, using no memory."""
  zero = np.zeros((), np.float32)
  return {key: np.broadcast_to(zero, shape)
          for key, shape in json.loads(str(shapes_json)).items()}


@pytest.mark.parametrize('name', ['sd15_unet', 'sd21_unet'])
def test_full_size_unet_table_matches_diffusers_layout(golden, name):
  """Every key of the real SD 1.5 / 2.1 U-Net layout is used or ignored and
  fits the param shapes the parsed config gives (jax.eval_shape only)."""
  config_json = json.loads(str(golden[f'{name}_config_json']))
  config = sd.unet_config_from_diffusers(config_json)
  tensors = _zero_strided(golden[f'{name}_shapes_json'])
  params = sd.convert_unet_encoder(tensors, sd.abstract_unet_params(config),
                                   config, source_name=name)
  ignored = {k for k in tensors if k.split('.')[0] in
             ('up_blocks', 'conv_norm_out', 'conv_out')}
  used = {rule.source for rule in sd.unet_encoder_rules(config)}
  assert used == set(tensors) - ignored
  assert len(core.flatten_params(params)) == len(used)


def test_full_size_vae_table_matches_diffusers_layout(golden):
  config = sd.vae_config_from_diffusers(
      json.loads(str(golden['sd_vae_config_json'])))
  assert config == sd_vae.SD_VAE
  tensors = _zero_strided(golden['sd_vae_shapes_json'])
  params = sd.convert_vae_encoder(tensors, sd.abstract_vae_params(config),
                                  config, source_name='sd_vae')
  assert params['quant_conv']['kernel'].shape == (1, 1, 8, 8)
  assert params['mid_block']['attentions_0']['to_q']['kernel'].shape == (
      512, 512)
  used = {rule.source for rule in sd.vae_encoder_rules(config)}
  assert used == {k for k in tensors if not k.startswith(
      ('decoder.', 'post_quant_conv.'))}


# --- Real config.json values --------------------------------------------------

# The keys of the released unet/config.json files that shape the model.
_SD_DOWN = ['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D']
SD15_UNET_JSON = {
    '_class_name': 'UNet2DConditionModel', 'act_fn': 'silu',
    'attention_head_dim': 8, 'block_out_channels': [320, 640, 1280, 1280],
    'center_input_sample': False, 'cross_attention_dim': 768,
    'down_block_types': _SD_DOWN, 'downsample_padding': 1,
    'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 4,
    'layers_per_block': 2, 'mid_block_scale_factor': 1, 'norm_eps': 1e-05,
    'norm_num_groups': 32, 'out_channels': 4, 'sample_size': 64,
    'up_block_types': ['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3,
}
SD21_UNET_JSON = dict(
    SD15_UNET_JSON, attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024, dual_cross_attention=False,
    num_class_embeds=None, only_cross_attention=False, sample_size=96,
    upcast_attention=True, use_linear_projection=True)


@pytest.mark.parametrize('variant,config_json,heads,head_dims,context', [
    ('sd1.5', SD15_UNET_JSON, (8, 8, 8, 8), (40, 80, 160, 160), 768),
    ('sd2.1', SD21_UNET_JSON, (5, 10, 20, 20), (64, 64, 64, 64), 1024),
])
def test_real_unet_configs(golden, variant, config_json, heads, head_dims,
                           context):
  config = sd.unet_config_from_diffusers(config_json)
  assert config == sd_unet.VARIANTS[variant]
  # The same, from the config.json diffusers writes (every key spelled out).
  name = {'sd1.5': 'sd15_unet', 'sd2.1': 'sd21_unet'}[variant]
  full = json.loads(str(golden[f'{name}_config_json']))
  assert sd.unet_config_from_diffusers(full) == config
  assert config.num_attention_heads == heads
  assert config.head_dims == head_dims  # Mid block: the last entry.
  assert config.use_linear_projection == (variant == 'sd2.1')

  shapes = sd.abstract_unet_params(config)
  block = shapes['down_blocks_0']['attentions_0']['transformer_blocks_0']
  assert block['attn1']['to_q']['kernel'].shape == (320, 320)
  assert block['attn2']['to_k']['kernel'].shape == (context, 320)
  assert block['ff']['geglu_proj']['kernel'].shape == (320, 2 * 4 * 320)
  mid = shapes['mid_block']['attentions_0']['transformer_blocks_0']
  assert mid['attn2']['to_v']['kernel'].shape == (context, 1280)
  assert shapes['time_embedding']['linear_1']['kernel'].shape == (320, 1280)
  assert 'attentions_0' not in shapes['down_blocks_3']
  assert 'downsamplers_0' not in shapes['down_blocks_3']
  # 512 px images -> 64x64 latents -> 8x8 mid-block features.
  out = jax.eval_shape(
      sd_unet.UNetEncoder(config).apply, {'params': shapes},
      jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32),
      jax.ShapeDtypeStruct((2,), jnp.int32),
      jax.ShapeDtypeStruct((2, 77, context), jnp.float32))
  assert out.shape == (2, 8, 8, 1280)


def test_real_vae_config():
  config_json = {
      '_class_name': 'AutoencoderKL', 'act_fn': 'silu',
      'block_out_channels': [128, 256, 512, 512],
      'down_block_types': ['DownEncoderBlock2D'] * 4, 'in_channels': 3,
      'latent_channels': 4, 'layers_per_block': 2, 'norm_num_groups': 32,
      'out_channels': 3, 'sample_size': 512,
      'up_block_types': ['UpDecoderBlock2D'] * 4}
  config = sd.vae_config_from_diffusers(config_json)
  assert config == sd_vae.SD_VAE
  assert (config.scaling_factor, config.downsample_factor) == (0.18215, 8)
  out = jax.eval_shape(
      sd_vae.VAEEncoder(config).apply,
      {'params': sd.abstract_vae_params(config)},
      jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))
  assert [x.shape for x in out] == [(1, 64, 64, 4)] * 2


@pytest.mark.parametrize('key,value,match', [
    ('addition_embed_type', 'text_time', "addition_embed_type='text_time'"),
    ('_class_name', 'AutoencoderKL', "_class_name 'AutoencoderKL'"),
    ('attention_head_dim', [5, 10], r'attention_head_dim=\[5, 10\] must be'),
    ('down_block_types', ['CrossAttnDownBlock2D', 'AttnDownBlock2D'] * 2,
     r"\['AttnDownBlock2D', 'AttnDownBlock2D'\] are not supported"),
    ('attention_head_dim', 7, 'not divisible into 7 attention heads'),
    ('class_embed_type', 'timestep', "class_embed_type='timestep' is not"),
    ('class_embed_type', 'projection',
     'needs projection_class_embeddings_input_dim'),
    ('class_embeddings_concat', True, 'class_embeddings_concat=True'),
])
def test_unsupported_unet_config_is_named(key, value, match):
  config_json = dict(SD15_UNET_JSON, **{key: value})
  with pytest.raises(ValueError, match=match) as error:
    sd.unet_config_from_diffusers(config_json, source_name='x/config.json')
  assert str(error.value).startswith('x/config.json: ')


# --- Bad checkpoints and folders ----------------------------------------------


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
  key = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'
  tensors = _tensors()
  assert tensors[key].shape == (16, 32)
  tensors[key] = np.zeros((16, 24), np.float16)
  sd_dir = _copy_sd_dir(tmp_path, tensors=tensors)
  with pytest.raises(core.ConversionError) as error:
    sd.load_unet_encoder(sd_dir)
  message = str(error.value)
  assert f'key {key!r} has shape (16, 24)' in message, message
  assert 'expected shape (16, 32)' in message, message
  assert 'down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k' in (
      message), message
  assert str(sd_dir / 'unet' / WEIGHTS) in message, message


def test_missing_key_is_named(tmp_path):
  key = 'mid_block.attentions.0.transformer_blocks.0.norm2.weight'
  tensors = {k: v for k, v in _tensors().items() if k != key}
  with pytest.raises(core.ConversionError,
                     match=f'missing key {key!r}'.replace('.', r'\.')):
    sd.load_unet_encoder(_copy_sd_dir(tmp_path, tensors=tensors))


@pytest.mark.parametrize('key', [
    'down_blocks.0.resnets.1.conv1.weight',  # A layer the config lacks.
    'mid_block.attentions.1.norm.weight',
    'add_embedding.linear_1.weight',  # An SDXL-only module.
])
def test_unexpected_key_is_named(tmp_path, key):
  tensors = _tensors()
  tensors[key] = np.zeros((16,), np.float16)
  tensors['up_blocks.7.anything.weight'] = np.zeros((3,), np.float16)
  with pytest.raises(core.ConversionError) as error:
    sd.load_unet_encoder(_copy_sd_dir(tmp_path, tensors=tensors))
  message = str(error.value)
  assert f'unused key {key!r}' in message, message
  assert 'up_blocks.7' not in message, message  # Up blocks are ignored.
  assert '(1 problem(s))' in message, message


def test_vae_unexpected_and_missing_keys(tmp_path):
  tensors = _tensors(sub='vae')
  del tensors['encoder.mid_block.resnets.1.norm2.bias']
  tensors['encoder.extra.weight'] = np.zeros((4,), np.float16)
  tensors['decoder.extra.weight'] = np.zeros((4,), np.float16)  # Ignored.
  sd_dir = _copy_sd_dir(tmp_path, tensors=tensors, sub='vae')
  with pytest.raises(core.ConversionError) as error:
    sd.load_vae_encoder(sd_dir)
  message = str(error.value)
  assert "missing key 'encoder.mid_block.resnets.1.norm2.bias'" in message
  assert "unused key 'encoder.extra.weight'" in message, message
  assert 'decoder.extra' not in message, message


def test_linear_projection_weights_with_a_conv_projection_config():
  """SD 2.x weights (Linear proj_in) under an SD 1.x-style config."""
  config = sd.read_unet_config(SD2_DIR)
  wrong = dataclasses.replace(config, use_linear_projection=False)
  with pytest.raises(core.ConversionError) as error:
    sd.convert_unet_encoder(_tensors(SD2_DIR), sd.abstract_unet_params(wrong),
                            wrong, source_name='sd2/unet')
  message = str(error.value)
  key = 'down_blocks.0.attentions.0.proj_in.weight'
  assert f'key {key!r} has shape (16, 16)' in message, message
  assert 'conv1x1_to_dense' in message, message


def test_unet_weights_in_the_vae_folder(tmp_path):
  sd_dir = _copy_sd_dir(tmp_path, tensors=_tensors(), sub='vae')
  with pytest.raises(core.ConversionError,
                     match="no 'encoder.conv_in.weight'; not a diffusers"):
    sd.load_vae_encoder(sd_dir)


def test_original_ldm_checkpoint_gets_a_hint():
  tensors = {'model.diffusion_model.input_blocks.0.0.weight':
             np.zeros((1,), np.float32)}
  with pytest.raises(core.ConversionError, match='from_single_file'):
    sd.convert_unet_encoder(tensors, {}, sd.read_unet_config(SD1_DIR))


def test_pickled_weights_are_refused(tmp_path):
  sd_dir = _copy_sd_dir(tmp_path)
  (sd_dir / 'unet' / WEIGHTS).unlink()
  (sd_dir / 'unet' / 'diffusion_pytorch_model.bin').write_bytes(
      b'never unpickled')
  with pytest.raises(FileNotFoundError) as error:
    sd.load_unet_encoder(sd_dir)
  message = str(error.value)
  assert "'diffusion_pytorch_model.bin'" in message, message
  assert 'never loaded' in message and 'safetensors' in message, message


def test_variant_files(tmp_path):
  sd_dir = _copy_sd_dir(tmp_path)
  (sd_dir / 'unet' / WEIGHTS).rename(
      sd_dir / 'unet' / 'diffusion_pytorch_model.fp16.safetensors')
  with pytest.raises(FileNotFoundError, match="variant='fp16'"):
    sd.load_unet_encoder(sd_dir)
  _, params = sd.load_unet_encoder(sd_dir, variant='fp16')
  _, plain = sd.load_unet_encoder(SD1_DIR)
  jax.tree.map(np.testing.assert_array_equal, plain, params)


def test_missing_folder_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'unet/config\.json'):
    sd.load_unet_encoder(tmp_path / 'nowhere')
  sd_dir = _copy_sd_dir(tmp_path)
  (sd_dir / 'unet' / WEIGHTS).unlink()
  with pytest.raises(FileNotFoundError, match='no diffusion_pytorch_model'):
    sd.load_unet_encoder(sd_dir)


def test_deprecated_vae_attention_names(tmp_path):
  """diffusers < 0.14 saves call the VAE attention query/key/value/proj_attn."""
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value',
             'to_out.0': 'proj_attn'}
  prefix = 'encoder.mid_block.attentions.0.'
  tensors = {}
  for key, value in _tensors(sub='vae').items():
    for new, old in renames.items():
      key = key.replace(f'{prefix}{new}.', f'{prefix}{old}.')
    tensors[key] = value
  assert f'{prefix}proj_attn.weight' in tensors
  _, params = sd.load_vae_encoder(
      _copy_sd_dir(tmp_path, tensors=tensors, sub='vae'))
  _, plain = sd.load_vae_encoder(SD1_DIR)
  jax.tree.map(np.testing.assert_array_equal, plain, params)


def test_params_are_float32_from_float16_files():
  tensors = _tensors()
  assert tensors['conv_in.weight'].dtype == np.float16
  _, params = sd.load_unet_encoder(SD1_DIR)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {
      np.dtype(np.float32)}
  np.testing.assert_array_equal(
      params['conv_in']['kernel'],
      tensors['conv_in.weight'].astype(np.float32).transpose(2, 3, 1, 0))
