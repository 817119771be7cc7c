"""The white-box reverse model: SD VAE latents -> U-Net encoder -> head.

Uses the tiny diffusers SD folder tests/golden/tiny_sd (unet/ + vae/,
cross_attention_dim 32) with a fixed context file, and the fake DiffusionDB
parts of `fake_assets` through `configs/diffusiondb_unet.py:tiny=1`. If the
cache test fails, check `reverse_model.frozen_stage_weights` and
`feature_cache.load_or_compute`; if the VAE moved, check
`reverse_model.frozen_param_groups` and the stop-gradient in
`WhiteBoxBackbone.latents`.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fake_assets
from configs import diffusiondb_unet
from reverse_sd import checkpointing
from reverse_sd import feature_cache
from reverse_sd import pretrained
from reverse_sd import saved_run
from reverse_sd import train
from reverse_sd.convert import sd
from reverse_sd.data import datasets
from reverse_sd.models import reverse_model
from reverse_sd.models import sd_vae
from reverse_sd.models import whitebox

GOLDEN = pathlib.Path(__file__).resolve().parent / 'golden'
TINY_SD = GOLDEN / 'tiny_sd'
CROSS_ATTENTION_DIM = 32  # tiny_sd/unet/config.json.
MID_CHANNELS = 32  # Its last block_out_channels.


@pytest.fixture(scope='module')
def manual_dir(tmp_path_factory):
  return fake_assets.write_diffusiondb(tmp_path_factory.mktemp('manual')).root


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


def _config(context_file, extra=''):
  return diffusiondb_unet.get_config(f'tiny=1,context={context_file}{extra}')


def _images(count, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (count, size, size, 3)), jnp.uint8)


def _model_and_params(config):
  model = pretrained.create_model(config.model)
  params = jax.jit(model.init)(jax.random.key(0), _images(1))['params']
  return model, params


@pytest.fixture(scope='module')
def tiny_model(context_file):
  return _model_and_params(_config(context_file))


def test_forward_shapes_and_the_two_stages(tiny_model):
  model, params = tiny_model
  assert sorted(params['backbone']) == ['unet', 'vae']  # Context: no param.

  @jax.jit
  def forward(params, images):
    variables = {'params': params}
    latents = model.apply(variables, images,
                          method=reverse_model.ReverseModel.extract_features)
    return (model.apply(variables, images), latents,
            model.apply(variables, features=latents))

  out, latents, from_latents = forward(params, _images(3))
  assert out['embedding'].shape == (3, 384)
  assert out['features'].shape == (3, MID_CHANNELS)
  np.testing.assert_allclose(jnp.linalg.norm(out['embedding'], axis=-1), 1.0,
                             atol=1e-5)
  assert float(jnp.abs(out['embedding'][0] - out['embedding'][1]).max()) > 1e-4
  # The frozen stage gives latents; the model on them matches the model on
  # the images.
  assert latents.shape == (3, 16, 16, 4)
  np.testing.assert_allclose(from_latents['embedding'], out['embedding'],
                             atol=1e-6)


def test_noise_follows_the_rng(context_file, tiny_model):
  _, params = tiny_model
  config = _config(context_file)
  with config.unlocked():
    config.model.sd_timestep = 500
  clean_model = pretrained.create_model(config.model)
  with config.unlocked():
    config.model.sd_noise = 1.0
  model = pretrained.create_model(config.model)

  @jax.jit
  def embeddings(params, images):
    variables = {'params': params}
    run = lambda seed: model.apply(variables, images, rngs={
        'noise': jax.random.key(seed)})['embedding']
    return {'seed_1': run(1), 'seed_2': run(2),
            'clean': clean_model.apply(variables, images)['embedding'],
            # No rng (evaluation): a fixed draw, still noised.
            'no_rng': model.apply(variables, images)['embedding']}

  out = embeddings(params, _images(2))
  for a, b in (('seed_1', 'seed_2'), ('seed_1', 'clean'),
               ('no_rng', 'clean')):
    assert float(jnp.abs(out[a] - out[b]).max()) > 1e-4, (a, b)


def test_clip_folder_as_weights_is_refused(context_file):
  config = diffusiondb_unet.get_config(
      f'tiny=1,context={context_file},weights={GOLDEN / "tiny_clip_vision"}')
  with pytest.raises(FileNotFoundError,
                     match='not a diffusers Stable Diffusion folder.*CLIP'):
    pretrained.create_model(config.model)


def test_named_variant_must_match_the_folder(context_file):
  config = _config(context_file)
  with config.unlocked():
    config.model.variant = 'sd1.5'
  with pytest.raises(ValueError,
                     match='not an sd1.5 model.*block_out_channels'):
    pretrained.create_model(config.model)


def test_context_of_the_wrong_width_is_named(tmp_path):
  path = tmp_path / 'narrow.npy'
  np.save(path, np.zeros((77, 16), np.float32))
  with pytest.raises(ValueError,
                     match=f'{path}.*\\[T, {CROSS_ATTENTION_DIM}\\]'):
    pretrained.create_model(_config(path).model)


@pytest.fixture(scope='module')
def trained(manual_dir, data_dir, context_file, tmp_path_factory):
  """One short white-box run on the fake DiffusionDB parts."""
  config = _config(context_file, f',parts=1-3,manual_dir={manual_dir},'
                   f'data_dir={data_dir}')
  workdir = tmp_path_factory.mktemp('unet_run')
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def _cache_files(data_dir):
  return {p.stem: p for p in pathlib.Path(data_dir).rglob(
      f'{feature_cache.CACHE_DIR_NAME}/*/*.npy')}


def test_short_run_fine_tunes_the_unet_only(trained):
  _, workdir, results = trained
  assert (workdir / 'results.json').is_file()
  assert results['meta']['step'] > 0
  for split in ('validation', 'test'):
    assert -1 <= results['splits'][split]['cosine'] <= 1
  _, state = checkpointing.load_state_arrays(workdir)
  backbone = state['params']['backbone']
  _, vae = sd.load_vae_encoder(TINY_SD)
  for a, b in zip(jax.tree.leaves(vae), jax.tree.leaves(backbone['vae'])):
    np.testing.assert_array_equal(a, b)
  _, unet = sd.load_unet_encoder(TINY_SD)
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(unet), jax.tree.leaves(backbone['unet'])))


def test_latents_are_cached_once_and_equal_the_vae(trained, data_dir,
                                                   tmp_path):
  config, _, _ = trained
  files = _cache_files(data_dir)
  assert sorted(files) == ['test', 'train', 'validation']
  split = datasets.load_splits(config, ['train'])['train']
  cached = np.load(files['train'])
  assert cached.shape == (len(split), 16, 16, 4)
  vae_config, vae_params = sd.load_vae_encoder(TINY_SD)
  images = split.load_images(np.arange(len(split))).astype(np.float32)
  direct = jax.jit(lambda p, x: sd_vae.VAEEncoder(vae_config).apply(
      {'params': p}, x, method=sd_vae.VAEEncoder.latents))(
          vae_params, images / 127.5 - 1.0)
  np.testing.assert_allclose(cached, direct, atol=1e-5)
  # A second run reuses the cache.
  stamps = {name: p.stat().st_mtime_ns for name, p in files.items()}
  with config.unlocked():
    config.train.num_steps = 1
  train.train_and_evaluate(config, tmp_path / 'second_run')
  assert {name: p.stat().st_mtime_ns
          for name, p in _cache_files(data_dir).items()} == stamps


def test_restored_run_predicts_from_images(trained, data_dir):
  config, workdir, _ = trained
  run = saved_run.restore_run(workdir)
  split = datasets.load_splits(config, ['test'])['test']
  indices = np.arange(8) % len(split)
  from_images = run.predict_step(
      run.params, {'image': split.load_images(indices)})['embedding']
  latents = np.load(_cache_files(data_dir)['test'])[indices]
  from_latents = run.predict_step(run.params,
                                  {'features': latents})['embedding']
  np.testing.assert_allclose(from_images, from_latents, atol=1e-5)


def test_empty_prompt_context(context_file):
  sd_context = pytest.importorskip('reverse_sd.text.sd_context')
  if not (TINY_SD / 'text_encoder').is_dir():
    pytest.skip('tests/golden/tiny_sd has no text_encoder/ yet')
  config = diffusiondb_unet.get_config('tiny=1')  # context=empty.
  assert config.model.sd_context == 'empty'
  model, params = _model_and_params(config)
  assert isinstance(model.backbone, whitebox.WhiteBoxBackbone)
  np.testing.assert_array_equal(
      model.backbone.context.array,
      np.asarray(sd_context.empty_prompt_context(TINY_SD), np.float32))
  out = jax.jit(model.apply)({'params': params}, _images(2))
  assert out['embedding'].shape == (2, 384)
