"""Curriculum learning: difficulty scores, stages, and resuming mid-stage."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import synthetic
from reverse_sd import checkpointing
from reverse_sd import curriculum
from reverse_sd import saved_run
from reverse_sd import sharding
from reverse_sd import train
from reverse_sd.data import pipeline
from reverse_sd.data import targets

REPO = pathlib.Path(__file__).resolve().parents[1]


class _FakeSource:

  def __init__(self, n):
    self._n = n

  def __len__(self):
    return self._n

  def __getitems__(self, indices):
    return [{'image': np.full((4, 4, 3), i, np.uint8)} for i in indices]


def _split(n):
  table = targets.SplitTable(
      ids=np.array([f'train/{i}' for i in range(n)]),
      prompts=np.array([f'prompt {i}' for i in range(n)]),
      embeddings=np.eye(n, 384, dtype=np.float32), attributes=None)
  return pipeline.SplitData('train', _FakeSource(n), table)


def _scores(n):
  # Example i has score -i: example 0 is the easiest.
  return -np.arange(n, dtype=np.float32)


def test_checkpoint_weights_favour_later_checkpoints():
  np.testing.assert_allclose(curriculum.checkpoint_weights(3, 'linear'),
                             [1 / 6, 2 / 6, 3 / 6])
  np.testing.assert_allclose(curriculum.checkpoint_weights(2, 'uniform'),
                             [0.5, 0.5])
  np.testing.assert_allclose(curriculum.checkpoint_weights(3, 'last'),
                             [0, 0, 1])
  with pytest.raises(ValueError, match='linear'):
    curriculum.checkpoint_weights(3, 'lineer')


def test_stage_boundaries_and_pools():
  stages = curriculum.make_stages(_scores(30), (1 / 3, 1 / 2, 1.0),
                                  (0.25, 0.25, 0.5), total_steps=100)
  assert [s.start_step for s in stages] == [0, 25, 50]
  # The pools are the easiest 10, 15 and 30 examples.
  assert [s.pool.tolist() for s in stages] == [
      list(range(10)), list(range(15)), list(range(30))]
  # Lengths are normalised; fractions round up.
  stages = curriculum.make_stages(_scores(10), (0.25, 1.0), (1, 3), 8)
  assert [s.start_step for s in stages] == [0, 2]
  assert len(stages[0].pool) == 3


def test_ties_break_by_index_and_highest_score_is_easiest():
  order = curriculum.easiest_first(np.array([0.5, 0.9, 0.5, 0.1]))
  assert order.tolist() == [1, 0, 2, 3]


@pytest.mark.parametrize('fractions,lengths,match', [
    ((0.5, 0.3), (1, 1), 'non-decreasing'),
    ((0.0, 1.0), (1, 1), 'in \\(0, 1\\]'),
    ((0.5, 1.0), (1,), 'equal length'),
    ((0.5, 1.0), (1, 0), '> 0'),
])
def test_bad_schedules_are_named(fractions, lengths, match):
  with pytest.raises(ValueError, match=match):
    curriculum.make_stages(_scores(10), fractions, lengths, 10)


def _stream(split, stages, batch=4):
  return pipeline.TrainStream(split, global_batch_size=batch, shuffle_seed=3,
                              process_index=0, process_count=1, stages=stages)


def test_each_stage_draws_only_from_its_pool_and_covers_it():
  split = _split(24)
  stages = curriculum.make_stages(_scores(24), (1 / 3, 1 / 2, 1.0),
                                  (0.25, 0.25, 0.5), total_steps=24)
  stream = _stream(split, stages)
  batch = 4
  for step in range(24):
    indices = stream.global_indices(step * batch, batch)
    stage = stream.stage_of_step(step)
    assert set(indices.tolist()) <= set(stages[stage].pool.tolist()), step
  # Stage 1 is steps 0-5: 24 draws from its 8 examples = 3 full passes, each
  # a permutation, and the passes differ.
  draws = stream.global_indices(0, 6 * batch)
  passes = draws.reshape(3, 8)
  for one_pass in passes:
    assert sorted(one_pass.tolist()) == list(range(8))
  assert len({tuple(p) for p in passes.tolist()}) > 1
  # Stage 2 (steps 6-11) starts at the start of a fresh pass of its pool.
  stage2 = stream.global_indices(6 * batch, 12)
  assert sorted(stage2.tolist()) == list(range(12))


def test_resume_mid_stage_continues_the_same_stream():
  split = _split(24)
  stages = curriculum.make_stages(_scores(24), (1 / 3, 1 / 2, 1.0),
                                  (0.25, 0.25, 0.5), total_steps=24)
  straight = _stream(split, stages).iterate(0)
  all_batches = [next(straight)['index'].tolist() for _ in range(16)]
  # A new stream (a restarted process) resumed at step 8, mid stage 2.
  resumed = _stream(split, stages).iterate(8 * 4)
  assert [next(resumed)['index'].tolist() for _ in range(8)] == (
      all_batches[8:16])


def test_stream_without_stages_is_unchanged():
  split = _split(10)
  plain = pipeline.TrainStream(split, global_batch_size=5, shuffle_seed=0,
                               process_index=0, process_count=1)
  rng = np.random.default_rng([0, 0])
  assert plain.global_indices(0, 10).tolist() == rng.permutation(10).tolist()


def test_scores_file_round_trip_and_errors(tmp_path):
  scores = curriculum.Scores(
      ids=np.array(['a', 'b', 'c']), scores=np.array([0.1, 0.9, 0.5],
                                                     np.float32),
      source='model:/x', checkpoint_steps=np.array([4, 8]),
      checkpoint_weights=np.array([1 / 3, 2 / 3]),
      per_checkpoint=np.zeros((2, 3), np.float32))
  path = tmp_path / 'scores.npz'
  scores.save(path)
  loaded = curriculum.Scores.load(path)
  assert loaded.source == 'model:/x'
  np.testing.assert_allclose(loaded.for_ids(np.array(['c', 'a'])), [0.5, 0.1])
  with pytest.raises(ValueError, match='no difficulty score'):
    loaded.for_ids(np.array(['a', 'z']), str(path))
  with pytest.raises(FileNotFoundError, match='curriculum score'):
    curriculum.Scores.load(tmp_path / 'missing.npz')
  path.write_bytes(b'not an npz')
  with pytest.raises(ValueError, match='scores.npz is not a readable'):
    curriculum.Scores.load(path)


def test_spearman_matches_hand_computed_values():
  assert curriculum.spearman(np.array([1., 2, 3]), np.array([3., 5, 9])) == (
      pytest.approx(1.0))
  assert curriculum.spearman(np.array([1., 2, 3]), np.array([3., 2, 1])) == (
      pytest.approx(-1.0))
  # Ties get the average rank: ranks (0.5, 0.5, 2) vs (0, 1, 2).
  expected = np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1]
  assert curriculum.spearman(np.array([1., 1, 2]), np.array([1., 2, 3])) == (
      pytest.approx(expected))


# ----------------------------------------------------------------------------
# With the model: a tiny baseline scores, a curriculum run trains from it.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


def _config(data_dir, **overrides):
  config = synthetic.get_config('tiny')
  with config.unlocked():
    config.data.data_dir = str(data_dir)
    config.eval.splits = ('test',)
    config.eval.periodic_splits = ()
    for key, value in overrides.items():
      section, name = key.split('.')
      config[section][name] = value
  return config


@pytest.fixture(scope='module')
def baseline(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('baseline')
  config = _config(data_dir, **{'train.num_steps': 8,
                                'train.checkpoint_every_steps': 4})
  train.train_and_evaluate(config, workdir)
  return workdir


def test_score_command_writes_scores_keyed_by_id(baseline, data_dir):
  output = baseline / 'scores.npz'
  proc = subprocess.run(
      [sys.executable, '-m', 'reverse_sd.curriculum', 'score',
       f'--workdir={baseline}', f'--output={output}', '--weights=linear'],
      cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
      timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout[proc.stdout.index('{'):])
  assert summary['checkpoint_steps'] == [4, 8]
  assert -1 <= summary['spearman_with_alignment'] <= 1
  scores = curriculum.Scores.load(output)
  assert len(scores.ids) == 256 and len(set(scores.ids.tolist())) == 256
  np.testing.assert_allclose(scores.checkpoint_weights, [1 / 3, 2 / 3])
  np.testing.assert_allclose(
      scores.scores, scores.checkpoint_weights @ scores.per_checkpoint,
      rtol=1e-5)
  # The checkpoints differ, so the per-checkpoint cosines do too.
  assert not np.allclose(scores.per_checkpoint[0], scores.per_checkpoint[1])
  # `compare` reports the same rank correlation for the saved file.
  proc = subprocess.run(
      [sys.executable, '-m', 'reverse_sd.curriculum', 'compare',
       f'--workdir={baseline}', f'--scores={output}'],
      cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
      timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  compared = json.loads(proc.stdout[proc.stdout.index('{'):])
  assert compared['spearman_with_alignment'] == pytest.approx(
      summary['spearman_with_alignment'])
  del data_dir


def test_score_command_names_a_directory_that_is_not_a_run(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'reverse_sd.curriculum', 'score',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode != 0
  assert 'config.json does not exist' in proc.stderr


def test_alignment_difficulty_puts_aligned_examples_first(data_dir, tmp_path):
  config = _config(data_dir, **{'curriculum.difficulty': 'alignment'})
  train_split = train.datasets.load_splits(config, ['train'])['train']
  stages = curriculum.stages_for_run(config, tmp_path, train_split.table.ids,
                                     total_steps=16)
  alignment = curriculum.alignment_of_train(config).for_ids(
      train_split.table.ids)
  first = alignment[stages[0].pool]
  rest = np.delete(alignment, stages[0].pool)
  assert first.min() >= rest.max()


class _Crash(Exception):
  pass


def test_killed_curriculum_run_resumes_mid_stage(baseline, data_dir, tmp_path,
                                                 monkeypatch):
  """Stages start at steps 0, 3 and 6 of 12; the run dies after step 5,
  resumes from its step-4 checkpoint (mid stage 2), and ends with the
  parameters of a run that never stopped."""
  config = _config(data_dir, **{
      'train.num_steps': 12, 'train.checkpoint_every_steps': 4,
      'train.eval_every_steps': 100, 'curriculum.difficulty': 'model',
      'curriculum.scorer_workdir': str(baseline)})
  straight = train.train_and_evaluate(config, tmp_path / 'straight')
  assert [s['start_step'] for s in straight['meta']['curriculum']['stages']
         ] == [0, 3, 6]
  assert (tmp_path / 'straight' / curriculum.SCORES_FILE_NAME).exists()

  calls = {'n': 0}
  original_to_global = sharding.host_to_global

  def dying_to_global(batch, mesh):
    if 'embedding' in batch:
      calls['n'] += 1
      if calls['n'] == 6:
        raise _Crash('simulated kill after step 5')
    return original_to_global(batch, mesh)

  monkeypatch.setattr(sharding, 'host_to_global', dying_to_global)
  with pytest.raises(_Crash):
    train.train_and_evaluate(config, tmp_path / 'resumed')
  manager = checkpointing.create_manager(tmp_path / 'resumed', read_only=True)
  assert manager.latest_step() == 4
  monkeypatch.setattr(sharding, 'host_to_global', original_to_global)
  train.train_and_evaluate(config, tmp_path / 'resumed')
  _, a = checkpointing.load_state_arrays(tmp_path / 'straight')
  _, b = checkpointing.load_state_arrays(tmp_path / 'resumed')
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

  # Resuming with another schedule is refused: it would change the stream.
  with config.unlocked():
    config.curriculum.fractions = (0.5, 0.75, 1.0)
    config.train.num_steps = 16
  with pytest.raises(ValueError, match='curriculum='):
    train.train_and_evaluate(config, tmp_path / 'resumed')


def test_model_difficulty_without_a_source_is_explained(data_dir, tmp_path):
  config = _config(data_dir, **{'curriculum.difficulty': 'model'})
  with pytest.raises(ValueError, match='scorer_workdir'):
    train.train_and_evaluate(config, tmp_path / 'run')


def test_run_config_of_an_older_run_gets_new_fields_defaults(tmp_path):
  """A workdir written before a config field existed stays readable."""
  config = synthetic.get_config('tiny').to_dict()
  del config['model']['frozen_features']
  del config['curriculum']
  config['data']['manual_dir'] = '/data/x'  # A data-set-specific field stays.
  (tmp_path / 'config.json').write_text(json.dumps(config))
  loaded = saved_run.load_run_config(tmp_path)
  assert loaded.model.frozen_features is False
  assert loaded.curriculum.difficulty == ''
  assert loaded.data.manual_dir == '/data/x'
  assert loaded.model.variant == 'tiny'
  (tmp_path / 'config.json').write_text('{not json')
  with pytest.raises(ValueError, match='config.json is not valid JSON'):
    saved_run.load_run_config(tmp_path)
