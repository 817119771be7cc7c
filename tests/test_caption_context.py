"""Per-example caption contexts of the white-box backbone (sd_context='caption').

Uses the tiny diffusers SD folder tests/golden/tiny_sd (text encoder width
and U-Net cross_attention_dim 32) and the fake DiffusionDB parts of
`fake_assets`. If the cache tests fail, check
`feature_cache.caption_contexts` against `sd_context.encode_prompts`; if the
run fails, check that batches carry 'context' (`pipeline.SplitData.load`,
`evaluate.model_inputs`, the key list in `train._train_loop`).
"""

import dataclasses
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fake_assets
from configs import diffusiondb_unet
from reverse_sd import evaluate
from reverse_sd import feature_cache
from reverse_sd import predict
from reverse_sd import pretrained
from reverse_sd import saved_run
from reverse_sd import train
from reverse_sd.data import datasets
from reverse_sd.data import pipeline
from reverse_sd.data import targets
from reverse_sd.text import sd_context

TINY_SD = pathlib.Path(__file__).resolve().parent / 'golden' / 'tiny_sd'
WIDTH = 32  # tiny_sd text encoder width = U-Net cross_attention_dim.
PROMPTS = ('a red cat on a mat', 'a blue robot, artstation', '',
           'a red cat on a mat')
# float16 storage of float32 contexts of magnitude ~1.
F16_TOLERANCE = dict(rtol=2e-3, atol=2e-3)


@dataclasses.dataclass
class _Table:
  prompts: np.ndarray


@dataclasses.dataclass
class _PromptSplit:
  """What `caption_contexts` reads of a split: name, length, prompts."""
  name: str
  table: _Table

  def __len__(self):
    return len(self.table.prompts)


def _split(prompts=PROMPTS, name='train'):
  return _PromptSplit(name, _Table(np.asarray(prompts, dtype=object)))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  # The empty-prompt context and the analysis caption cache live here.
  monkeypatch.setenv(sd_context.CACHE_DIR_ENV, str(tmp_path / 'cache'))


def test_cached_contexts_equal_the_text_encoder_and_are_reused(
    tmp_path, monkeypatch):
  root = tmp_path / 'captions'
  contexts = feature_cache.caption_contexts(TINY_SD, _split(), root)
  assert isinstance(contexts, np.memmap)
  assert contexts.dtype == np.float16
  assert contexts.shape == (len(PROMPTS), 77, WIDTH)
  direct = sd_context.encode_prompts(TINY_SD, list(PROMPTS))
  np.testing.assert_allclose(contexts.astype(np.float32), direct,
                             **F16_TOLERANCE)
  files = sorted(p.name for p in root.iterdir())
  assert len(files) == 2 and files[0].startswith('train-'), files  # npy+json
  assert not any('.tmp' in name for name in files)

  def no_encoder(*args, **kwargs):
    raise AssertionError('the text encoder ran again; the cache was not used')

  monkeypatch.setattr(sd_context, 'SDTextEncoder', no_encoder)
  again = feature_cache.caption_contexts(TINY_SD, _split(), root)
  np.testing.assert_array_equal(again, contexts)
  # Other prompts (or another split name) are another file.
  with pytest.raises(AssertionError, match='ran again'):
    feature_cache.caption_contexts(TINY_SD, _split(PROMPTS[:3]), root)
  with pytest.raises(AssertionError, match='ran again'):
    feature_cache.caption_contexts(TINY_SD, _split(name='test'), root)


def test_contexts_differ_per_prompt_and_empty_is_unconditional(tmp_path):
  contexts = feature_cache.caption_contexts(TINY_SD, _split(),
                                            tmp_path / 'captions')
  contexts = contexts.astype(np.float32)
  assert np.abs(contexts[0] - contexts[1]).max() > 1e-2
  np.testing.assert_array_equal(contexts[0], contexts[3])  # Same prompt.
  np.testing.assert_allclose(contexts[2],
                             sd_context.empty_prompt_context(TINY_SD),
                             **F16_TOLERANCE)


def test_a_bad_cache_file_is_named(tmp_path):
  root = tmp_path / 'captions'
  feature_cache.caption_contexts(TINY_SD, _split(), root)
  path, = root.glob('*.npy')
  np.save(path, np.zeros((len(PROMPTS), 77, WIDTH), np.float32))
  with pytest.raises(ValueError, match=f'{path}.*Delete it'):
    feature_cache.caption_contexts(TINY_SD, _split(), root)


class _ImageSource:
  """In-memory stand-in for a TFDS data source: image i is filled with i."""

  def __init__(self, n):
    self._n = n

  def __len__(self):
    return self._n

  def __getitems__(self, indices):
    return [{'image': np.full((8, 8, 3), i, np.uint8)} for i in indices]


def _image_split(n, **fields):
  table = targets.SplitTable(
      ids=np.array([f'train/{i}' for i in range(n)]),
      prompts=np.array([f'prompt {i}' for i in range(n)]),
      embeddings=np.eye(n, 384, dtype=np.float32), attributes=None)
  return pipeline.SplitData('train', _ImageSource(n), table, **fields)


def test_batches_carry_the_context_of_their_examples():
  n = 5
  context = np.arange(n, dtype=np.float16)[:, None, None] * np.ones(
      (1, 77, 4), np.float16)
  for features in (None, np.zeros((n, 2, 2, 4), np.float32)):
    split = _image_split(n, context=context, features=features)
    batch = split.load(np.array([3, 1]))
    assert batch['context'].dtype == np.float16
    np.testing.assert_array_equal(batch['context'][:, 0, 0], [3, 1])
    assert ('image' in batch) == (features is None)
    batches = list(pipeline.eval_batches(split, global_batch_size=4,
                                         process_index=0, process_count=1))
    last = batches[-1]  # Example 4, then padding.
    np.testing.assert_array_equal(last['context'][:, 0, 0], [4, 0, 0, 0])
    np.testing.assert_array_equal(last['mask'], [1, 0, 0, 0])
    inputs = evaluate.model_inputs(batches[0])
    assert sorted(inputs) == sorted(
        ['context', 'images_BxHxWx3' if features is None else 'features'])
  assert 'context' not in _image_split(n).load(np.array([0]))
  with pytest.raises(ValueError, match=r'expected \[5, T, D\]'):
    _image_split(n, context=context[:4])


def test_model_reads_the_context_of_each_example():
  config = diffusiondb_unet.get_config('tiny=1,context=caption')
  assert config.model.sd_context == 'caption'
  model = pretrained.create_model(config.model)
  # VAE latents of 32 px images (the tiny VAE halves the side), so that only
  # the U-Net and the head are compiled.
  latents = jnp.asarray(np.random.default_rng(0).normal(
      size=(1, 16, 16, 4)).repeat(2, axis=0), jnp.float32)
  # Initialising needs no context: parameter shapes do not depend on it.
  # (Random values in those shapes: compiling the U-Net's init is slow.)
  shapes = jax.eval_shape(lambda key: model.init(key, features=latents),
                          jax.random.key(0))['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: jnp.asarray(0.05 * rng.normal(size=s.shape), s.dtype), shapes)
  context = jnp.asarray(rng.normal(size=(2, 77, WIDTH)),
                        jnp.float16)
  apply = lambda c: model.apply({'params': params}, features=latents,
                                context=c)
  out = jax.jit(apply)(context)
  # Same latents, different contexts: different embeddings.
  assert float(jnp.abs(out['embedding'][0] - out['embedding'][1]).max()) > 1e-4
  with pytest.raises(ValueError, match="sd_context='caption'.*none was"):
    jax.eval_shape(apply, None)
  with pytest.raises(ValueError, match=r'expected \[2, T, 32\]'):
    jax.eval_shape(apply, context[..., :16])
  # Without frozen features: images (through the VAE) and contexts.
  images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  out = jax.eval_shape(lambda v, x, c: model.apply(v, x, context=c),
                       variables, images, context)
  assert out['embedding'].shape == (2, 384)


def test_caption_needs_the_text_encoder(tmp_path):
  sd_dir = tmp_path / 'sd_without_text'
  for sub in ('unet', 'vae'):
    shutil.copytree(TINY_SD / sub, sd_dir / sub)
  config = diffusiondb_unet.get_config(f'tiny=1,context=caption,'
                                       f'weights={sd_dir}')
  with pytest.raises(FileNotFoundError,
                     match="sd_context='caption'.*no text_encoder/, "
                           'tokenizer/ subfolder'):
    pretrained.create_model(config.model)
  with pytest.raises(FileNotFoundError, match='no text_encoder/'):
    feature_cache.attach_caption_contexts(config, {})


@pytest.fixture(scope='module')
def caption_run(tmp_path_factory):
  """One short white-box run with context=caption on the fake parts."""
  manual_dir = fake_assets.write_diffusiondb(
      tmp_path_factory.mktemp('manual')).root
  data_dir = tmp_path_factory.mktemp('data')
  config = diffusiondb_unet.get_config(
      f'tiny=1,context=caption,parts=1-3,manual_dir={manual_dir},'
      f'data_dir={data_dir}')
  with config.unlocked():
    config.train.num_steps = 3
    config.train.checkpoint_every_steps = 3
  workdir = tmp_path_factory.mktemp('caption_run')
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(sd_context.CACHE_DIR_ENV,
                 str(tmp_path_factory.mktemp('cache')))
    train.train_and_evaluate(config, workdir)
  return config, workdir, data_dir


def _finite_numbers(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _finite_numbers(value)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield tree


def test_short_caption_run_writes_finite_results(caption_run):
  config, workdir, data_dir = caption_run
  results = json.loads((workdir / 'results.json').read_text())
  assert results['meta']['step'] == 3
  for split in config.eval.splits:
    assert -1 <= results['splits'][split]['cosine'] <= 1
    assert all(math.isfinite(v)
               for v in _finite_numbers(results['splits'][split]))
  cached = sorted(pathlib.Path(data_dir).rglob(
      f'{feature_cache.CACHE_DIR_NAME}/{feature_cache.CAPTION_CACHE_DIR_NAME}'
      '/*.npy'))
  assert sorted(p.name.split('-')[0] for p in cached) == [
      'test', 'train', 'validation']
  train_split = datasets.load_splits(config, ['train'])['train']
  contexts = np.load(next(p for p in cached if p.name.startswith('train-')))
  assert contexts.shape == (len(train_split), 77, WIDTH)
  np.testing.assert_allclose(
      contexts[:3].astype(np.float32),
      sd_context.encode_prompts(TINY_SD,
                                train_split.table.prompts[:3].tolist()),
      **F16_TOLERANCE)


def test_restored_run_evaluates_stored_splits_and_predict_refuses(
    caption_run, tmp_path):
  config, workdir, _ = caption_run
  run = saved_run.restore_run(workdir)
  # As analyze.py does: a split loaded without contexts; predict_split
  # computes them (and caches them under $REVERSE_SD_CACHE_DIR).
  split = datasets.load_splits(config, ['test'])['test']
  assert split.context is None
  lazy = evaluate.predict_split(run.predict_step, run.params, split,
                                mesh=run.mesh, global_batch_size=8)
  attached = feature_cache.attach_caption_contexts(config, {'test': split})
  direct = evaluate.predict_split(run.predict_step, run.params,
                                  attached['test'], mesh=run.mesh,
                                  global_batch_size=8)
  np.testing.assert_allclose(lazy['embedding'], direct['embedding'],
                             atol=1e-5)
  assert np.all(np.isfinite(lazy['embedding']))
  image = tmp_path / 'new.png'
  image.write_bytes(fake_assets.encode(
      fake_assets.random_image(np.random.default_rng(0))))
  with pytest.raises(ValueError, match="sd_context='caption'.*own prompt"):
    predict.predict_to_files(run, [image], num_prompts=0)
  with pytest.raises(ValueError, match='new images do not have'):
    predict.Predictor(run)
