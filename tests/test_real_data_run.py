"""End to end on real formats: fake DiffusionDB parts, a tiny HF CLIP tower.

`configs/diffusiondb_clip.py:tiny=1` with the golden tiny CLIP checkpoint
(written by transformers 5 in the reference environment) in both modes: the
paper's frozen tower + MLP on cached features, and full fine-tuning.
"""

import pathlib

import jax
import numpy as np
import pytest

import fake_assets
from configs import diffusiondb_clip
from reverse_sd import checkpointing
from reverse_sd import feature_cache
from reverse_sd import train
from reverse_sd.convert import clip

GOLDEN = pathlib.Path(__file__).resolve().parent / 'golden'
WEIGHTS = GOLDEN / 'tiny_clip_vision'


@pytest.fixture(scope='module')
def manual_dir(tmp_path_factory):
  return fake_assets.write_diffusiondb(tmp_path_factory.mktemp('manual')).root


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


def _config(manual_dir, data_dir, mode, weights=WEIGHTS):
  return diffusiondb_clip.get_config(
      f'tiny=1,mode={mode},parts=1-3,manual_dir={manual_dir},'
      f'data_dir={data_dir},weights={weights}')


def _backbone(workdir):
  _, state = checkpointing.load_state_arrays(workdir)
  return state['params']['backbone']


def test_frozen_tower_and_mlp_on_cached_features(manual_dir, data_dir,
                                                 tmp_path):
  config = _config(manual_dir, data_dir, 'mlp')
  results = train.train_and_evaluate(config, tmp_path / 'run')
  for split in ('validation', 'test'):
    scores = results['splits'][split]
    assert -1 <= scores['cosine'] <= 1 and scores['num_examples'] > 0
    assert 'oracle_cosine' not in scores  # Real data: no attributes.
  # The tower stayed the pretrained one, to the bit.
  _, pretrained = clip.load_clip_vision(WEIGHTS, image_size=32,
                                        with_projection=True)
  for a, b in zip(jax.tree.leaves(pretrained),
                  jax.tree.leaves(_backbone(tmp_path / 'run'))):
    np.testing.assert_array_equal(a, b)
  # Features were cached once per split; a second run reuses them.
  cached = list(pathlib.Path(data_dir).rglob(
      f'{feature_cache.CACHE_DIR_NAME}/*/train.npy'))
  assert len(cached) == 1
  stamp = cached[0].stat().st_mtime_ns
  train.train_and_evaluate(config, tmp_path / 'run2')
  assert cached[0].stat().st_mtime_ns == stamp


def test_finetune_moves_the_tower(manual_dir, data_dir, tmp_path):
  config = _config(manual_dir, data_dir, 'finetune')
  results = train.train_and_evaluate(config, tmp_path / 'run')
  assert results['meta']['step'] > 0
  _, pretrained = clip.load_clip_vision(WEIGHTS, image_size=32,
                                        with_projection=True)
  moved = [not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(pretrained), jax.tree.leaves(_backbone(tmp_path / 'run')))]
  assert any(moved)


def test_weights_of_another_variant_are_refused(manual_dir, data_dir,
                                                tmp_path):
  config = _config(manual_dir, data_dir, 'finetune')
  with config.unlocked():
    config.model.variant = 'small'
  with pytest.raises(ValueError, match='not a small tower'):
    train.train_and_evaluate(config, tmp_path / 'run')


def test_missing_weights_folder_is_named(manual_dir, data_dir, tmp_path):
  config = _config(manual_dir, data_dir, 'finetune',
                   weights=tmp_path / 'nowhere')
  with pytest.raises((FileNotFoundError, ValueError), match='nowhere'):
    train.train_and_evaluate(config, tmp_path / 'run')
