"""Tests for reverse_sd.convert.sd_export: Flax generator -> diffusers folder.

The exported folder must load back through the same loaders that read
SD 1.5 / 2.1 (`sd.load_unet_encoder`, `sd.load_vae_encoder`), giving exactly
the generator's encoder params; and the decoder tables must match diffusers'
real layout (checked on the tiny diffusers folders and the full-size key
shapes in golden/sd_golden.npz).
"""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from reverse_sd.convert import core
from reverse_sd.convert import sd
from reverse_sd.convert import sd_export
from reverse_sd.models import sd_unet
from reverse_sd.models import sd_vae

GOLDEN_DIR = pathlib.Path(__file__).parent / 'golden'
WEIGHTS = 'diffusion_pytorch_model.safetensors'

UNET_CONFIG = sd_unet.UNetConfig(
    block_out_channels=(8, 16),
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
    layers_per_block=(1, 2), num_attention_heads=(1, 2),
    transformer_layers_per_block=(1, 1), cross_attention_dim=12,
    in_channels=4, norm_num_groups=4)
# Three blocks: the decoder has two upsamplers and a channel change.
VAE_CONFIG = sd_vae.VAEConfig(
    block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
    down_block_types=('DownEncoderBlock2D',) * 3,
    mid_block_add_attention=True, scaling_factor=0.7)


def _random_params(abstract, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32),
      abstract)


def _assert_trees_equal(actual, expected, what):
  actual, expected = (core.flatten_params(actual),
                      core.flatten_params(expected))
  assert sorted(actual) == sorted(expected), (
      f'{what}: leaves differ: {sorted(set(actual) ^ set(expected))[:5]}')
  for path in expected:
    assert np.array_equal(actual[path], expected[path]), f'{what}: {path}'


@pytest.fixture(scope='module', params=[(False, None), (True, None),
                                        (True, 12)],
                ids=['conv_projection', 'linear_projection',
                     'class_embedding'])
def exported(request, tmp_path_factory):
  linear, class_dim = request.param
  unet_config = dataclasses.replace(
      UNET_CONFIG, use_linear_projection=linear,
      projection_class_embeddings_input_dim=class_dim)
  unet_params = _random_params(
      sd_export.abstract_diffusion_unet_params(unet_config), seed=1)
  vae_params = _random_params(
      sd_export.abstract_autoencoder_params(VAE_CONFIG), seed=2)
  out_dir = sd_export.export_pipeline(
      tmp_path_factory.mktemp('exported') / 'generator',
      unet_config=unet_config, unet_params=unet_params,
      vae_config=VAE_CONFIG, vae_params=vae_params, image_size=32)
  return out_dir, unet_config, unet_params, vae_params


def test_sd_loaders_read_the_generators_encoders(exported):
  out_dir, unet_config, unet_params, vae_params = exported
  assert sd.read_unet_config(out_dir) == unet_config
  assert sd.read_vae_config(out_dir) == VAE_CONFIG
  config, params = sd.load_unet_encoder(out_dir)
  assert config == unet_config
  _assert_trees_equal(params, unet_params['encoder'], 'U-Net encoder')
  config, params = sd.load_vae_encoder(out_dir)
  assert config == VAE_CONFIG
  _assert_trees_equal(params, vae_params['encoder'], 'VAE encoder')


def test_full_models_round_trip(exported):
  out_dir, unet_config, unet_params, vae_params = exported
  config, params = sd_export.load_full_unet(out_dir)
  assert config == unet_config
  _assert_trees_equal(params, unet_params, 'DiffusionUNet')
  config, params = sd_export.load_autoencoder(out_dir)
  assert config == VAE_CONFIG
  _assert_trees_equal(params, vae_params, 'AutoencoderKL')


def test_exported_keys_and_shapes(exported):
  out_dir, unet_config, _, _ = exported
  unet = load_file(str(out_dir / 'unet' / WEIGHTS))
  assert set(unet) == {r.source for r in sd_export.full_unet_rules(
      unet_config)}
  assert {v.dtype for v in unet.values()} == {np.dtype(np.float32)}
  # up_blocks.0 mirrors down block 1 (2 layers -> 3 resnets); its last
  # resnet reads 16 channels + conv_in-side skip of 8.
  assert unet['up_blocks.0.resnets.2.conv1.weight'].shape == (16, 24, 3, 3)
  assert unet['up_blocks.0.resnets.2.conv_shortcut.weight'].shape == (
      16, 24, 1, 1)
  assert unet['up_blocks.0.upsamplers.0.conv.weight'].shape == (16, 16, 3, 3)
  assert 'up_blocks.1.upsamplers.0.conv.weight' not in unet
  assert 'up_blocks.1.attentions.0.norm.weight' not in unet  # UpBlock2D.
  assert unet['conv_out.weight'].shape == (4, 8, 3, 3)
  proj_in = unet['up_blocks.0.attentions.1.proj_in.weight']
  assert proj_in.shape == ((16, 16) if unet_config.use_linear_projection
                           else (16, 16, 1, 1))
  vae = load_file(str(out_dir / 'vae' / WEIGHTS))
  assert set(vae) == {r.source for r in sd_export.autoencoder_rules(
      VAE_CONFIG)}
  assert vae['decoder.up_blocks.1.upsamplers.0.conv.weight'].shape == (
      16, 16, 3, 3)
  assert 'decoder.up_blocks.2.upsamplers.0.conv.weight' not in vae
  assert vae['decoder.up_blocks.2.resnets.0.conv_shortcut.weight'].shape == (
      8, 16, 1, 1)
  assert vae['decoder.mid_block.attentions.0.to_out.0.weight'].shape == (
      16, 16)
  assert vae['post_quant_conv.weight'].shape == (4, 4, 1, 1)
  assert vae['quant_conv.weight'].shape == (8, 8, 1, 1)
  unet_json = json.loads((out_dir / 'unet' / 'config.json').read_text())
  assert unet_json['up_block_types'] == ['CrossAttnUpBlock2D', 'UpBlock2D']
  assert unet_json['attention_head_dim'] == [1, 2]
  assert unet_json['layers_per_block'] == [1, 2]
  assert unet_json['sample_size'] == 8
  vae_json = json.loads((out_dir / 'vae' / 'config.json').read_text())
  assert vae_json['shift_factor'] is None
  assert vae_json['up_block_types'] == ['UpDecoderBlock2D'] * 3


def test_bare_encoder_trees_export_encoder_keys_only(tmp_path):
  unet_params = _random_params(sd.abstract_unet_params(UNET_CONFIG))
  vae_params = _random_params(sd.abstract_vae_params(VAE_CONFIG))
  sd_export.export_pipeline(tmp_path, unet_config=UNET_CONFIG,
                            unet_params={'params': unet_params},
                            vae_config=VAE_CONFIG, vae_params=vae_params)
  unet = load_file(str(tmp_path / 'unet' / WEIGHTS))
  assert set(unet) == {r.source for r in sd.unet_encoder_rules(UNET_CONFIG)}
  vae = load_file(str(tmp_path / 'vae' / WEIGHTS))
  assert set(vae) == {r.source for r in sd.vae_encoder_rules(VAE_CONFIG)}
  _assert_trees_equal(sd.load_unet_encoder(tmp_path)[1], unet_params,
                      'U-Net encoder')
  _assert_trees_equal(sd.load_vae_encoder(tmp_path)[1], vae_params,
                      'VAE encoder')


@pytest.mark.parametrize('sd_dir', ['tiny_sd', 'tiny_sd2'])
def test_real_diffusers_unet_round_trips(sd_dir):
  """diffusers' own files: load all keys, export, get the same tensors."""
  config, params = sd_export.load_full_unet(GOLDEN_DIR / sd_dir)
  original = load_file(str(GOLDEN_DIR / sd_dir / 'unet' / WEIGHTS))
  _assert_tensors_equal(sd_export.unet_tensors(config, params), original)
  assert sd_export.unet_config_json(config)['up_block_types'] == json.loads(
      (GOLDEN_DIR / sd_dir / 'unet' / 'config.json').read_text())[
          'up_block_types']


def test_real_diffusers_vae_round_trips():
  config, params = sd_export.load_autoencoder(GOLDEN_DIR / 'tiny_sd')
  original = load_file(str(GOLDEN_DIR / 'tiny_sd' / 'vae' / WEIGHTS))
  _assert_tensors_equal(sd_export.vae_tensors(config, params), original)


def _assert_tensors_equal(exported, original):
  assert sorted(exported) == sorted(original), sorted(
      set(exported) ^ set(original))[:5]
  for key, value in original.items():
    assert exported[key].shape == value.shape, key
    assert np.array_equal(exported[key], value.astype(np.float32)), key


def test_missing_extra_and_wrong_shape_leaves_are_named(tmp_path):
  unet_params = _random_params(
      sd_export.abstract_diffusion_unet_params(UNET_CONFIG))
  vae_params = _random_params(sd_export.abstract_autoencoder_params(
      VAE_CONFIG))
  del unet_params['up_blocks_1']['resnets_0']['conv1']['bias']
  unet_params['up_blocks_0']['extra'] = {'kernel': np.zeros((2, 2))}
  unet_params['conv_out']['bias'] = np.zeros(5, np.float32)
  out_dir = tmp_path / 'out'
  with pytest.raises(core.ConversionError) as error:
    sd_export.export_pipeline(out_dir, unet_config=UNET_CONFIG,
                              unet_params=unet_params, vae_config=VAE_CONFIG,
                              vae_params=vae_params)
  message = str(error.value)
  assert "missing param 'up_blocks_1/resnets_0/conv1/bias'" in message
  assert "unexpected param 'up_blocks_0/extra/kernel'" in message
  assert "'conv_out/bias' has shape (5,); the config needs (4,)" in message
  assert 'DiffusionUNet params' in message
  assert not out_dir.exists()  # Nothing written.


def test_leaf_without_rule_is_named():
  abstract = sd.abstract_vae_params(VAE_CONFIG)
  params = _random_params(abstract)
  rules = [r for r in sd.vae_encoder_rules(VAE_CONFIG)
           if r.target != 'conv_out/bias']
  with pytest.raises(core.ConversionError,
                     match="'conv_out/bias' .* has no rule"):
    sd_export.params_to_tensors(params, rules, abstract)


def test_latent_channel_mismatch_is_named(tmp_path):
  with pytest.raises(ValueError, match='latent_channels=3'):
    sd_export.export_pipeline(
        tmp_path, unet_config=UNET_CONFIG, unet_params={},
        vae_config=dataclasses.replace(VAE_CONFIG, latent_channels=3),
        vae_params={})


# --- Full-size layouts (shapes only) ------------------------------------------


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN_DIR / 'sd_golden.npz', allow_pickle=False) as data:
    return {name: data[name] for name in data.files
            if name.endswith('_json')}


def _zero_params(abstract):
  zero = np.zeros((), np.float32)
  return jax.tree.map(lambda leaf: np.broadcast_to(zero, leaf.shape),
                      abstract)


def _shapes(tensors):
  return {key: tuple(value.shape) for key, value in tensors.items()}


@pytest.mark.parametrize('name', ['sd15_unet', 'sd21_unet'])
def test_full_size_unet_export_matches_diffusers_layout(golden, name):
  config = sd.unet_config_from_diffusers(
      json.loads(str(golden[f'{name}_config_json'])))
  tensors = sd_export.unet_tensors(config, _zero_params(
      sd_export.abstract_diffusion_unet_params(config)))
  expected = {key: tuple(shape) for key, shape in json.loads(
      str(golden[f'{name}_shapes_json'])).items()}
  assert _shapes(tensors) == expected


def test_full_size_vae_export_matches_diffusers_layout(golden):
  tensors = sd_export.vae_tensors(sd_vae.SD_VAE, _zero_params(
      sd_export.abstract_autoencoder_params(sd_vae.SD_VAE)))
  expected = {key: tuple(shape) for key, shape in json.loads(
      str(golden['sd_vae_shapes_json'])).items()}
  assert _shapes(tensors) == expected
