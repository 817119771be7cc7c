"""Restoring a trained run and predicting images: same outputs as before
saving, JSON lines, embeddings file, prompt banks and bad input."""

import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from reverse_sd import evaluate
from reverse_sd import predict
from reverse_sd import saved_run
from reverse_sd import train
from reverse_sd.data import datasets
from reverse_sd.data import preprocess
from reverse_sd.text import prompt_bank as prompt_bank_lib

import tiny_run

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_IMAGES = 6  # Training images written as PNG files for predict.


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny run, and the live parameters' outputs on training images."""
  data_dir = tmp_path_factory.getbasetemp() / 'analyze_predict_data'
  workdir = tmp_path_factory.mktemp('run')
  captured = {}
  original = evaluate.evaluate_model

  def capturing_evaluate_model(predict_step, params, *args, **kwargs):
    captured['predict_step'], captured['params'] = predict_step, params
    captured['mesh'] = kwargs['mesh']
    return original(predict_step, params, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluate, 'evaluate_model', capturing_evaluate_model)
    train.train_and_evaluate(tiny_run.config(data_dir), workdir)
  split = datasets.load_splits(tiny_run.config(data_dir),
                               ['train'])['train']
  live = evaluate.predict_split(captured['predict_step'], captured['params'],
                                split, mesh=captured['mesh'],
                                global_batch_size=32)
  images_dir = tmp_path_factory.mktemp('images')
  for i in range(NUM_IMAGES):
    image = split.load_images(np.array([i]))[0]
    (images_dir / f'train_{i}.png').write_bytes(preprocess.encode_image(image))
  return {'workdir': workdir, 'data_dir': data_dir, 'images': images_dir,
          'live': {k: v[:NUM_IMAGES] for k, v in live.items()},
          'train_prompts': split.table.prompts}


@pytest.fixture(scope='module')
def run(trained):
  return saved_run.restore_run(trained['workdir'])


def _run_cli(module, args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                        env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _png_claiming_size(width, height) -> bytes:
  """A PNG whose header claims width x height (a decompression bomb)."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) +
          chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))


# ----------------------------------------------------------------------------
# Restoring.


def test_restored_run_matches_the_checkpoint(run):
  assert run.step == 4 and run.steps == (2, 4)
  assert run.input_shape == (32, 32, 3)
  assert run.vocabulary is not None and len(run.vocabulary) > 10
  assert run.at_step(2).step == 2


def test_workdir_without_checkpoints_is_named(trained, tmp_path):
  shutil.copy(trained['workdir'] / 'config.json', tmp_path / 'config.json')
  with pytest.raises(FileNotFoundError, match='No checkpoints in .*/checkp'):
    saved_run.restore_run(tmp_path)
  with pytest.raises(FileNotFoundError, match='config.json does not exist'):
    saved_run.restore_run(tmp_path / 'nothing')


def test_unknown_step_lists_the_steps(trained):
  with pytest.raises(ValueError, match=r'step 3 .*\[2, 4\]'):
    saved_run.restore_run(trained['workdir'], step=3)


def test_checkpoint_of_another_model_names_the_keys(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained['workdir'], workdir)
  config = json.loads((workdir / 'config.json').read_text())
  config['model']['backbone'] = 'vit'  # The checkpoint is a convnet's.
  (workdir / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match='does not fit this model') as error:
    saved_run.restore_run(workdir)
  assert 'backbone/' in str(error.value)


def test_missing_vocabulary_file_is_named(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained['workdir'], workdir)
  (workdir / 'vocab.json').unlink()
  with pytest.raises(FileNotFoundError, match='vocab.json'):
    saved_run.restore_run(workdir)


def test_prepare_image_follows_the_training_preprocessing():
  data = ml_collections.ConfigDict({'image_size': 32, 'input_size': 0})
  image = np.random.default_rng(0).integers(0, 255, (60, 100, 3), np.uint8)
  assert saved_run.prepare_image(image, data).shape == (32, 32, 3)
  data = ml_collections.ConfigDict({'image_size': 64, 'input_size': 48,
                                    'resize_mode': 'center_crop'})
  expected = preprocess.clip_preprocess(
      preprocess.resize_and_crop(image, 64, 'center_crop'), 48)
  np.testing.assert_array_equal(saved_run.prepare_image(image, data), expected)
  assert saved_run.model_input_shape(data) == (48, 48, 3)


# ----------------------------------------------------------------------------
# The command line.


def test_cli_predicts_like_the_live_model_and_isolates_bad_images(
    trained, tmp_path):
  folder = tmp_path / 'in'
  shutil.copytree(trained['images'], folder / 'nested')
  (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  (folder / 'bomb.png').write_bytes(_png_claiming_size(100_000, 100_000))
  (folder / 'notes.txt').write_text('not an image; skipped')
  output = tmp_path / 'preds.jsonl'
  embeddings = tmp_path / 'emb.npz'
  proc = _run_cli('reverse_sd.predict', [
      f'--workdir={trained["workdir"]}', '--top_k=4', '--num_prompts=3',
      '--batch_size=8', f'--output={output}', f'--embeddings_out={embeddings}',
      str(folder)])
  # Some images failed: a distinct status, and the rest are predicted.
  assert proc.returncode == predict.PARTIAL_FAILURE_EXIT_CODE, (
      proc.stderr[-3000:])
  records = [json.loads(line) for line in output.read_text().splitlines()]
  by_name = {pathlib.Path(r['path']).name: r for r in records}
  assert sorted(by_name) == sorted(
      ['bomb.png', 'corrupt.png'] +
      [f'train_{i}.png' for i in range(NUM_IMAGES)])
  assert 'decompression bomb' in by_name['bomb.png']['error']
  assert 'not a readable image' in by_name['corrupt.png']['error']
  assert 'corrupt.png' in by_name['corrupt.png']['error']
  saved = np.load(embeddings)
  assert saved['embedding'].shape == (len(records), 384)
  assert int(saved['step']) == 4
  live = trained['live']
  for i in range(NUM_IMAGES):
    record = by_name[f'train_{i}.png']
    assert record['embedding_file'] == str(embeddings)
    assert saved['ok'][record['row']]
    assert saved['paths'][record['row']] == record['path']
    # The restored model gives the live model's outputs.
    np.testing.assert_allclose(saved['embedding'][record['row']],
                               live['embedding'][i], atol=1e-5)
    probs = 1 / (1 + np.exp(-live['word_logits'][i].astype(np.float64)))
    assert len(record['top_words']) == 4
    top = np.sort(probs)[::-1][:4]
    np.testing.assert_allclose([w['score'] for w in record['top_words']], top,
                               atol=1e-5)
    # Nearest prompts come from the training prompts, nearest first.
    prompts = record['nearest_prompts']
    assert len(prompts) == 3
    assert all(p['prompt'] in set(trained['train_prompts']) for p in prompts)
    cosines = [p['cosine'] for p in prompts]
    assert cosines == sorted(cosines, reverse=True)
  assert 'row' not in by_name['bomb.png']
  assert saved['ok'].sum() == NUM_IMAGES  # Failed rows are marked.
  assert 'predict: ' in proc.stderr  # The progress line.


def test_cli_empty_folder_is_an_error(trained, tmp_path):
  (tmp_path / 'empty' / 'sub').mkdir(parents=True)
  (tmp_path / 'empty' / 'readme.txt').write_text('no images here')
  proc = _run_cli('reverse_sd.predict', [f'--workdir={trained["workdir"]}',
                                         str(tmp_path / 'empty')])
  assert proc.returncode == 1
  assert 'No images to predict' in proc.stderr
  assert not proc.stdout.strip()


def test_cli_bad_workdir_is_an_error(tmp_path, trained):
  proc = _run_cli('reverse_sd.predict', [f'--workdir={tmp_path}',
                                         str(trained['images'])])
  assert proc.returncode == 1
  assert 'config.json does not exist' in proc.stderr


# ----------------------------------------------------------------------------
# In process: batching, bad input, prompt banks.


def test_batches_are_padded_streamed_and_in_order(run, trained, monkeypatch):
  paths = sorted(trained['images'].iterdir()) * 4  # 24 images: 3 batches.
  loaded = []
  original = predict.read_image

  def counting_read_image(path, **kwargs):
    loaded.append(path)
    return original(path, **kwargs)

  monkeypatch.setattr(predict, 'read_image', counting_read_image)
  predictor = predict.Predictor(run, batch_size=8, num_prompts=0)
  records = predictor.predict(paths)
  first = next(records)
  # Only the first batch and the one read ahead have been read.
  assert len(loaded) == 16 and predictor.batch_size == 8
  rest = list(records)
  assert [r['row'] for r in [first, *rest]] == list(range(24))
  assert [r['path'] for r in [first, *rest]] == [str(p) for p in paths]
  assert 'nearest_prompts' not in first and len(first['top_words']) == 10


def test_read_image_refuses_images_over_max_pixels(tmp_path):
  path = tmp_path / 'big.png'
  Image.new('RGB', (40, 30), 'red').save(path)
  assert predict.read_image(path, max_pixels=1200).shape == (30, 40, 3)
  with pytest.raises(ValueError, match=r'40x30 = 1200 pixels.*1199'):
    predict.read_image(path, max_pixels=1199)
  bomb = tmp_path / 'bomb.png'
  bomb.write_bytes(_png_claiming_size(200_000, 200_000))
  with pytest.raises(ValueError, match='bomb.png.*decompression bomb'):
    predict.read_image(bomb)
  with pytest.raises(FileNotFoundError, match='missing.png'):
    predict.read_image(tmp_path / 'missing.png')


def test_find_images_recurses_and_explains_an_empty_input(tmp_path):
  (tmp_path / 'a' / 'b').mkdir(parents=True)
  Image.new('RGB', (4, 4)).save(tmp_path / 'a' / 'b' / 'x.JPG')
  Image.new('RGB', (4, 4)).save(tmp_path / 'a' / 'y.png')
  (tmp_path / 'a' / 'z.txt').write_text('')
  found = predict.find_images([tmp_path / 'a'])
  assert [p.name for p in found] == ['x.JPG', 'y.png']
  with pytest.raises(predict.NoImagesError, match='No images'):
    predict.find_images([_empty(tmp_path)])


def _empty(tmp_path):
  (tmp_path / 'empty').mkdir()
  return tmp_path / 'empty'


def test_prompt_bank_nearest_is_sorted_with_stable_ties():
  bank = prompt_bank_lib.PromptBank.from_table(
      ['a', 'b', 'a', 'c'], np.array([[1, 0], [0, 1], [1, 0], [1, 1]],
                                     np.float32), source='test')
  assert bank.prompts.tolist() == ['a', 'b', 'c']  # Repeats kept once.
  rows, cosines = bank.nearest(np.array([[1, 1], [0, 2]], np.float32), k=5)
  assert rows.shape == (2, 3)
  assert rows[0].tolist() == [2, 0, 1]  # 'a' and 'b' tie: lower row first.
  np.testing.assert_allclose(cosines[0], [1, 0.7071068, 0.7071068], atol=1e-6)
  assert rows[1].tolist() == [1, 2, 0]
  with pytest.raises(ValueError, match='dimension 2'):
    bank.nearest(np.zeros((1, 3)), 1)


def test_text_file_prompt_bank_is_embedded_once_and_cached(run, tmp_path):
  path = tmp_path / 'prompts.txt'
  path.write_text('a red circle\n\na blue square\na red circle\n')
  bank = predict.text_file_prompt_bank(run, path)
  assert bank.prompts.tolist() == ['a red circle', 'a blue square']
  cache = tmp_path / ('prompts.txt' + prompt_bank_lib.CACHE_SUFFIX)
  assert cache.is_file()

  def no_encoder():
    raise AssertionError('the cache should have been used')

  again = prompt_bank_lib.PromptBank.from_text_file(
      path, no_encoder, encoder_tag=_encoder_tag(run))
  np.testing.assert_array_equal(again.embeddings, bank.embeddings)
  # A changed file is embedded again.
  path.write_text('a green star\n')
  calls = []

  class FakeEncoder:

    def encode(self, prompts):
      calls.append(list(prompts))
      return np.ones((len(prompts), 384), np.float32)

  changed = prompt_bank_lib.PromptBank.from_text_file(
      path, FakeEncoder, encoder_tag=_encoder_tag(run))
  assert calls == [['a green star']] and len(changed) == 1
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n  \n')
  with pytest.raises(ValueError, match='empty.txt has no prompts'):
    predict.text_file_prompt_bank(run, empty)


def _encoder_tag(run):
  from reverse_sd.text import minilm  # pylint: disable=g-import-not-at-top
  model_dir = (pathlib.Path(run.config.text.model_dir)
               if run.config.text.model_dir else minilm.default_model_dir())
  return str(model_dir.resolve())


def test_user_prompt_bank_in_predictions(run, trained, tmp_path):
  path = tmp_path / 'bank.txt'
  path.write_text('\n'.join(trained['train_prompts'][:5].tolist()) + '\n')
  bank = predict.text_file_prompt_bank(run, path)
  # The bank's MiniLM embeddings are the data set's targets.
  np.testing.assert_allclose(bank.embeddings,
                             _targets(trained)[:5], atol=1e-4)
  predictor = predict.Predictor(run, bank=bank, num_prompts=2)
  records = list(predictor.predict(sorted(trained['images'].iterdir())))
  assert all(len(r['nearest_prompts']) == 2 for r in records)
  assert all(p['prompt'] in set(bank.prompts) for r in records
             for p in r['nearest_prompts'])


def _targets(trained):
  config = tiny_run.config(trained['data_dir'])
  return datasets.load_splits(config, ['train'])['train'].table.embeddings


def test_embedding_writer_abort_leaves_nothing(tmp_path):
  writer = predict.EmbeddingWriter(tmp_path / 'e.npz', 3)
  writer.write(0, np.ones(4, np.float32))
  writer.abort()
  assert not list(tmp_path.iterdir())
  with pytest.raises(ValueError, match='must end in .npz'):
    predict.EmbeddingWriter(tmp_path / 'e.npy', 3)
