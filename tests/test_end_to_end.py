"""End to end on a tiny synthetic corpus: results, resume, bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import synthetic
from reverse_sd import checkpointing
from reverse_sd import sharding
from reverse_sd import train
from reverse_sd.data import datasets
from reverse_sd.data import pipeline
from reverse_sd.data import synthetic as synthetic_data

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


def _config(data_dir, **train_overrides):
  config = synthetic.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = str(data_dir)
    config.eval.splits = ('test', 'test_shifted')
    for key, value in train_overrides.items():
      config.train[key] = value
  return config


def _run_main(args, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run(
      [sys.executable, '-m', 'reverse_sd.main', *args], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600, check=False)


def test_cli_tiny_run_writes_results(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  proc = _run_main(['--config=configs/synthetic.py:tiny', f'--workdir={workdir}',
                    f'--config.data.data_dir={data_dir}',
                    '--config.train.num_steps=6'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / 'results.json').read_text())
  for split in ('validation', 'test', 'test_shifted'):
    scores = results['splits'][split]
    for key in ('cosine', 'baseline_cosine', 'oracle_cosine'):
      assert -1.0 <= scores[key] <= 1.0, (split, key, scores[key])
    assert scores['num_examples'] == 64
    assert 0.0 <= scores['recall@1'] <= scores['recall@5'] <= scores[
        'recall@10'] <= 1.0
  assert results['meta']['step'] == 6
  # The oracle (true attributes, linear read-out) beats the mean embedding.
  assert (results['splits']['test']['oracle_cosine'] >
          results['splits']['test']['baseline_cosine'])
  assert 'gap closed' in proc.stdout and 'test_shifted' in proc.stdout
  assert (workdir / 'config.json').exists()
  assert list((workdir / 'checkpoints').iterdir())


def test_override_typo_fails_before_running(tmp_path):
  proc = _run_main(['--config=configs/synthetic.py:tiny',
                    f'--workdir={tmp_path / "run"}',
                    '--config.train.batch_sise=8'])
  assert proc.returncode != 0
  assert 'batch_sise' in proc.stderr
  assert not (tmp_path / 'run').exists()


def test_bad_config_value_names_the_key(data_dir, tmp_path):
  config = _config(data_dir)
  with config.unlocked():
    config.model.backbone = 'resnet9000'
  with pytest.raises(ValueError, match='config.model.backbone'):
    train.train_and_evaluate(config, tmp_path / 'run')


class _Crash(Exception):
  pass


def test_killed_run_resumes_same_stream(data_dir, tmp_path, monkeypatch):
  """A run that dies after step 7 resumes at its step-4 checkpoint and ends
  with the same parameters as a run that never stopped."""
  config = _config(data_dir, num_steps=12, checkpoint_every_steps=4,
                   eval_every_steps=100)
  offsets = []
  original = pipeline.TrainStream.batch_at

  def recording_batch_at(self, offset):
    offsets.append(offset)
    return original(self, offset)

  monkeypatch.setattr(pipeline.TrainStream, 'batch_at', recording_batch_at)
  train.train_and_evaluate(config, tmp_path / 'straight')
  straight_offsets = sorted(set(offsets))
  straight = _final_params(config, tmp_path / 'straight')

  calls = {'n': 0}
  original_to_global = sharding.host_to_global

  def dying_to_global(batch, mesh):
    if 'embedding' in batch:  # A train batch.
      calls['n'] += 1
      if calls['n'] == 8:
        raise _Crash('simulated kill after step 7')
    return original_to_global(batch, mesh)

  monkeypatch.setattr(sharding, 'host_to_global', dying_to_global)
  offsets.clear()
  with pytest.raises(_Crash):
    train.train_and_evaluate(config, tmp_path / 'resumed')
  manager = checkpointing.create_manager(tmp_path / 'resumed', read_only=True)
  assert manager.latest_step() == 4
  monkeypatch.setattr(sharding, 'host_to_global', original_to_global)
  offsets.clear()
  results = train.train_and_evaluate(config, tmp_path / 'resumed')
  assert results['meta']['step'] == 12
  batch = config.train.batch_size
  # The resumed run read exactly the batches the straight run read after
  # step 4 (prefetch may read ahead, never back).
  assert min(offsets) == 4 * batch
  assert [o for o in straight_offsets if 4 * batch <= o < 12 * batch] == [
      o for o in sorted(set(offsets)) if o < 12 * batch]
  resumed = _final_params(config, tmp_path / 'resumed')
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _final_params(config, workdir):
  step, state = checkpointing.load_state_arrays(workdir)
  assert step == config.train.num_steps
  return state['params']


def test_checkpoint_of_another_model_is_refused(data_dir, tmp_path):
  config = _config(data_dir, num_steps=2, checkpoint_every_steps=2)
  train.train_and_evaluate(config, tmp_path / 'run')
  other = _config(data_dir, num_steps=4)
  with other.unlocked():
    other.model.backbone = 'vit'
  with pytest.raises(ValueError, match='does not fit this model') as error:
    train.train_and_evaluate(other, tmp_path / 'run')
  # It names what differs: the ViT's parameters are not in the checkpoint.
  assert 'missing in checkpoint' in str(error.value)
  assert 'backbone/layers_0' in str(error.value)
  # The same config still resumes from it (nothing was damaged).
  results = train.train_and_evaluate(_config(data_dir, num_steps=4),
                                     tmp_path / 'run')
  assert results['meta']['step'] == 4


def test_data_dir_that_is_a_file_is_named(tmp_path):
  bad = tmp_path / 'not_a_dir'
  bad.write_text('x')
  with pytest.raises(ValueError, match='not_a_dir'):
    train.train_and_evaluate(_config(bad), tmp_path / 'run')


def test_corrupt_data_and_target_cache_are_named(data_dir, tmp_path):
  config = _config(data_dir)
  builder = datasets.open_builder(config.data)
  copy = tmp_path / 'data'
  shutil.copytree(data_dir, copy)
  config = _config(copy)
  # A truncated shard: the build check names the file.
  shard = next(pathlib.Path(copy).rglob('*test_shifted.array_record*'))
  shard.write_bytes(shard.read_bytes()[:100])
  with pytest.raises(synthetic_data.BrokenBuildError, match=shard.name):
    train.train_and_evaluate(config, tmp_path / 'run1')
  shutil.rmtree(copy)
  shutil.copytree(data_dir, copy)
  # A damaged target cache: named, with what to do.
  cache = next(pathlib.Path(copy).rglob('reverse_sd_targets/*/test.npz'))
  cache.write_bytes(b'not an npz')
  with pytest.raises(ValueError, match='target cache .*test.npz'):
    train.train_and_evaluate(config, tmp_path / 'run2')
  assert cache.exists()  # Nothing the user has is deleted.
  del builder


def test_vocabulary_head_run_reports_word_metrics(data_dir, tmp_path):
  config = _config(data_dir, num_steps=4)
  with config.unlocked():
    config.vocab.loss_weight = 0.1
  results = train.train_and_evaluate(config, tmp_path / 'run')
  scores = results['splits']['test']
  for key in ('vocab_f1@5', 'vocab_f1@10', 'vocab_map',
              'vocab_f1@10_frequent_words'):
    assert 0.0 <= scores[key] <= 1.0, key
  groups = scores['word_groups']
  assert {'shape', 'colour', 'style'} <= set(groups)
  for group in groups.values():
    assert 0.0 <= group['recall'] <= 1.0 and 0.0 < group['chance'] <= 1.0
  words = json.loads((tmp_path / 'run' / 'vocab.json').read_text())['words']
  assert 'background' in words and 'the' not in words
  # Resuming with another vocabulary size is refused, naming the file.
  with config.unlocked():
    config.vocab.size = 5
  with pytest.raises(ValueError, match='vocab.json differs'):
    train.train_and_evaluate(config, tmp_path / 'run')
