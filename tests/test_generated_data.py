"""Tests for the generated data set: resumable shards and the TFDS builder."""

import glob
import os

import ml_collections
import numpy as np
import pytest

from reverse_sd.data import datasets
from reverse_sd.data import generated
from reverse_sd.data import synthetic

SIZES = dict(num_train=20, num_validation=6, num_test=6, num_test_shifted=6)
IMAGE_SIZE = 16
SHARD_SIZE = 8  # train: 3 shards; the other splits: 1 each; 6 in all.
NUM_SHARDS = 6
GENERATOR_ID = 'checkpoint-abc@step100'
SAMPLER = 'ddim20_cfg3.0'
_ALIGNMENT_SCALE = 64.0


class FakeGenerator:
  """A make_batch whose images are a colour from (split, index); counts calls
  and can fail after a number of calls (a killed run)."""

  def __init__(self, fail_after: int | None = None):
    self.calls = []
    self.fail_after = fail_after

  def __call__(self, split, indices, examples):
    if self.fail_after is not None and len(self.calls) >= self.fail_after:
      raise KeyboardInterrupt('killed')  # Not an Exception: like a signal.
    self.calls.append((split, indices.tolist()))
    assert [e['id'] for e in examples] == [
        f'{split}/{i:08d}'.encode() if isinstance(examples[0]['id'], bytes)
        else f'{split}/{i:08d}' for i in indices]
    return fake_images(split, indices), fake_alignment(indices)


def fake_images(split, indices):
  offset = synthetic.SPLITS.index(split) * 50
  colours = np.stack([(indices * 7 + offset) % 256, (indices * 13) % 256,
                      np.full_like(indices, offset)], axis=-1).astype(np.uint8)
  return np.broadcast_to(colours[:, None, None, :],
                         (len(indices), IMAGE_SIZE, IMAGE_SIZE, 3)).copy()


def fake_alignment(indices):
  return (indices / _ALIGNMENT_SCALE).astype(np.float32)


def _read_split(builder, split):
  source = builder.as_data_source(split)
  return source.__getitems__(list(range(len(source))))


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def _build(data_dir, synthetic_builder, make_batch):
  return generated.build(data_dir, synthetic_builder=synthetic_builder,
                         generator_id=GENERATOR_ID, sampler=SAMPLER,
                         make_batch=make_batch, shard_size=SHARD_SIZE,
                         progress=False)


def _shard_files(data_dir):
  return sorted(glob.glob(os.path.join(
      str(data_dir), generated.SHARDS_DIR, '*', '*.npz')))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """The tiny synthetic corpus the generated data sets take prompts from."""
  return synthetic.build(tmp_path_factory.mktemp('synthetic'), seed=0,
                         image_size=IMAGE_SIZE, max_objects=1, progress=False,
                         **SIZES)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, corpus):
  """An uninterrupted build: (data_dir, builder, the fake's call list)."""
  data_dir = tmp_path_factory.mktemp('generated')
  fake = FakeGenerator()
  builder = _build(data_dir, corpus, fake)
  return data_dir, builder, fake.calls


def _assert_same_records(builder_a, builder_b):
  for split in synthetic.SPLITS:
    records_a = _read_split(builder_a, split)
    records_b = _read_split(builder_b, split)
    assert len(records_a) == len(records_b), split
    for a, b in zip(records_a, records_b):
      assert set(a) == set(b)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key],
                                      err_msg=f'{split} {_text(a["id"])} {key}')


def test_config_name_is_folder_safe_and_keys_every_input():
  name = generated.config_name(GENERATOR_ID, 'seed0_16px_20-6-6-6_1obj',
                               SAMPLER)
  assert name.startswith('seed0_16px_20-6-6-6_1obj_gen')
  assert name.endswith('_ddim20_cfg3.0')
  assert '/' not in name and '@' not in name
  others = {generated.config_name('other', 'seed0_16px_20-6-6-6_1obj',
                                  SAMPLER),
            generated.config_name(GENERATOR_ID, 'seed1_16px_20-6-6-6_1obj',
                                  SAMPLER),
            generated.config_name(GENERATOR_ID, 'seed0_16px_20-6-6-6_1obj',
                                  'ddim50_cfg3.0'),
            generated.config_name(GENERATOR_ID, 'seed0_16px_20-6-6-6_1obj',
                                  'ddim20 cfg3.0'),
            generated.config_name(GENERATOR_ID, 'seed0_16px_20-6-6-6_1obj',
                                  'ddim20/cfg3.0')}
  assert len(others) == 5 and name not in others
  for unsafe in others:
    assert generated._SAFE_NAME.match(unsafe), unsafe
  with pytest.raises(ValueError, match='sampler'):
    generated.config_name(GENERATOR_ID, 'seed0', '')


def test_features_match_the_synthetic_corpus(reference, corpus):
  _, builder, _ = reference
  assert builder.builder_config.name == generated.config_name(
      GENERATOR_ID, corpus.builder_config.name, SAMPLER)
  for split in synthetic.SPLITS:
    records = _read_split(builder, split)
    source_records = _read_split(corpus, split)
    assert len(records) == corpus.builder_config.num_examples(split)
    indices = np.arange(len(records))
    for index, record, source in zip(indices, records, source_records):
      for key in ('id', 'prompt', 'rendered_prompt', 'domain'):
        assert _text(record[key]) == _text(source[key]), (split, index, key)
      assert _text(record['id']) == f'{split}/{index:08d}'
      np.testing.assert_array_equal(record['attributes'],
                                    source['attributes'])
      assert np.float32(record['render_alignment']) == np.float32(
          source['alignment'])
    np.testing.assert_array_equal([r['alignment'] for r in records],
                                  fake_alignment(indices))
    np.testing.assert_array_equal(np.stack([r['image'] for r in records]),
                                  fake_images(split, indices))


def test_second_build_is_identical_and_generates_nothing(reference, corpus):
  data_dir, builder, calls = reference
  assert len(calls) == NUM_SHARDS  # One call per shard, none repeated.
  fake = FakeGenerator()
  again = _build(data_dir, corpus, fake)
  assert not fake.calls
  _assert_same_records(builder, again)


def test_killed_generation_resumes_without_losing_shards(
    tmp_path, reference, corpus):
  killed = FakeGenerator(fail_after=2)
  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path, corpus, killed)
  finished = _shard_files(tmp_path)
  assert [os.path.basename(p) for p in finished] == [
      'train-00000.npz', 'train-00001.npz']
  mtimes = {path: os.stat(path).st_mtime_ns for path in finished}

  resumed = FakeGenerator()
  builder = _build(tmp_path, corpus, resumed)
  assert resumed.calls == [
      ('train', list(range(16, 20))), ('validation', list(range(6))),
      ('test', list(range(6))), ('test_shifted', list(range(6)))]
  assert {p: os.stat(p).st_mtime_ns for p in finished} == mtimes
  assert len(_shard_files(tmp_path)) == NUM_SHARDS
  _assert_same_records(builder, reference[1])


def test_corrupt_shard_is_a_clear_error_and_is_kept(tmp_path, corpus):
  source = corpus.as_data_source('validation')
  paths = generated.generate_shards(tmp_path, source, 'validation',
                                    FakeGenerator(), shard_size=4,
                                    image_size=IMAGE_SIZE, progress=False)
  assert len(paths) == 2
  with open(paths[1], 'r+b') as f:
    f.truncate(100)
  fake = FakeGenerator()
  with pytest.raises(generated.BrokenShardError) as error:
    generated.generate_shards(tmp_path, source, 'validation', fake,
                              shard_size=4, progress=False)
  assert paths[1] in str(error.value) and 'Delete' in str(error.value)
  assert os.path.getsize(paths[1]) == 100  # Not deleted, not rewritten.
  assert not fake.calls

  # A shard of other indices (e.g. copied from elsewhere) is caught too.
  os.replace(paths[0], paths[1])
  with pytest.raises(generated.BrokenShardError,
                     match=r'validation-00001\.npz.*expected 2 indices 4'):
    generated.generate_shards(tmp_path, source, 'validation', fake,
                              shard_size=4, progress=False)


def test_another_shard_size_is_a_clear_error(tmp_path, corpus):
  source = corpus.as_data_source('test')
  generated.generate_shards(tmp_path, source, 'test', FakeGenerator(),
                            shard_size=4, progress=False)
  with pytest.raises(ValueError, match='shard_size=4, not 3'):
    generated.generate_shards(tmp_path, source, 'test', FakeGenerator(),
                              shard_size=3, progress=False)


@pytest.mark.parametrize('bad, problem', [
    (lambda images, alignment: (images.astype(np.float32), alignment),
     r'images are float32'),
    (lambda images, alignment: (images[:, :8], alignment),
     r'images are uint8 \(4, 8, 16, 3\)'),
    (lambda images, alignment: (images[:3], alignment),
     r'expected uint8 \(4, 16, 16, 3\)'),
    (lambda images, alignment: (images, alignment.astype(np.float64)),
     r'alignment is float64'),
    (lambda images, alignment: (images, alignment + 2),
     r'outside \[0, 1\]'),
])
def test_bad_make_batch_output_names_split_and_indices(tmp_path, corpus, bad,
                                                        problem):
  def make_batch(split, indices, examples):
    del examples
    return bad(fake_images(split, indices), fake_alignment(indices))

  with pytest.raises(ValueError,
                     match=r"make_batch\('test', indices 0\.\.3\).*" + problem):
    generated.generate_shards(tmp_path, corpus.as_data_source('test'), 'test',
                              make_batch, shard_size=4, image_size=IMAGE_SIZE,
                              progress=False)
  assert not glob.glob(str(tmp_path / '*.npz'))


def test_missing_shard_when_packing_says_run_generation_first(
    tmp_path, corpus):
  config = generated._config_from_synthetic(
      corpus.builder_config, generator_id=GENERATOR_ID, sampler=SAMPLER)
  shards_dir = str(tmp_path / 'shards')
  generated.generate_shards(shards_dir, corpus.as_data_source('train'),
                            'train', FakeGenerator(), shard_size=SHARD_SIZE,
                            progress=False)
  os.remove(generated.shard_path(shards_dir, 'train', 1))
  builder = generated._open_builder(str(tmp_path), config,
                                    synthetic_builder=corpus,
                                    shards_dir=shards_dir)
  with pytest.raises(generated.NotBuiltError,
                     match=r'train-00001\.npz is missing: run generation'):
    list(builder._generate_examples('train'))


def test_open_prepared_and_open_builder(reference):
  data_dir, builder, _ = reference
  name = builder.builder_config.name
  opened = generated.open_prepared(data_dir, name)
  assert opened.builder_config.to_json() == builder.builder_config.to_json()
  _assert_same_records(builder, opened)

  with pytest.raises(generated.NotBuiltError,
                     match=r"'nope' is not built.*python -m reverse_sd\.loop"):
    generated.open_prepared(data_dir, 'nope')
  with pytest.raises(ValueError, match='config name'):
    generated.open_prepared(data_dir, '../escape')

  config = ml_collections.ConfigDict(dict(
      data_dir=str(data_dir), name='generated', generated_name=name))
  from_config = datasets.open_builder(config)
  assert from_config.builder_config.name == name
  assert len(from_config.as_data_source('train')) == SIZES['num_train']

  config.generated_name = ''
  with pytest.raises(ValueError, match=r'python -m reverse_sd\.loop'):
    datasets.open_builder(config)
  config.name = 'unknown'
  with pytest.raises(ValueError, match="'generated'"):
    datasets.open_builder(config)


def test_damaged_build_is_reported_not_deleted(tmp_path, corpus):
  builder = _build(tmp_path, corpus, FakeGenerator())
  shard = os.fspath(builder.info.splits['test'].filepaths[0])
  with open(shard, 'r+b') as f:
    f.truncate(10)
  with pytest.raises(synthetic.BrokenBuildError, match='Delete that folder'):
    generated.open_prepared(tmp_path, builder.builder_config.name)
  fake = FakeGenerator()
  with pytest.raises(synthetic.BrokenBuildError):
    _build(tmp_path, corpus, fake)
  assert not fake.calls and os.path.getsize(shard) == 10
