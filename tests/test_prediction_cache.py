"""Cached predictions: saved once per run, step and split; clear errors for
missing or broken files. (The model path itself is tested by the real
`evaluate.predict_split`; here a fake run stands in for it.)"""

import numpy as np
import pytest

from reverse_sd import prediction_cache


def _fake(split, step, size=4):
  rng = np.random.default_rng(step)
  return prediction_cache.Predictions(
      split, step, np.array([f'{split}{i}' for i in range(size)]),
      rng.normal(size=(size, 3)).astype(np.float32),
      rng.normal(size=(size, 3)).astype(np.float32))


def test_load_or_predict_computes_once_then_reads(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(prediction_cache, 'latest_checkpoint_step', lambda _: 7)
  monkeypatch.setattr(
      prediction_cache, 'compute_predictions',
      lambda run, splits, batch_size: {s: _fake(s, run) for s in splits})

  def load_run(workdir, step):
    calls.append(step)
    return step  # compute_predictions above only needs the step.

  first = prediction_cache.load_or_predict_many(tmp_path, ['train', 'test'],
                                           load_run=load_run)
  assert calls == [7]
  path = tmp_path / 'predictions' / 'test_step7.npz'
  assert first['test'].path == path and path.is_file()
  again = prediction_cache.load_or_predict(tmp_path, 'test', load_run=load_run)
  assert calls == [7]  # Read from the file; the run was not restored.
  np.testing.assert_array_equal(again.predicted, first['test'].predicted)
  np.testing.assert_array_equal(again.ids, first['test'].ids)
  assert again.step == 7
  assert not list(tmp_path.glob('predictions/.*'))  # No temporary files left.


def test_load_predictions_without_step_takes_the_newest(tmp_path):
  for step in (2, 10):
    prediction_cache.save_predictions(
        _fake('test', step), prediction_cache.predictions_path(tmp_path, 'test',
                                                          step))
  assert prediction_cache.cached_steps(tmp_path, 'test') == [2, 10]
  assert prediction_cache.load_predictions(tmp_path, 'test').step == 10
  with pytest.raises(FileNotFoundError, match=r'step 5 .*saved steps: \[2, '
                     r'10\].*--step=5 --splits=test'):
    prediction_cache.load_predictions(tmp_path, 'test', step=5)


def test_broken_files_give_clear_errors(tmp_path):
  path = prediction_cache.predictions_path(tmp_path, 'test', 1)
  path.parent.mkdir(parents=True)
  np.savez(path, ids=np.array(['a']), predicted_embedding=np.ones((1, 3)))
  with pytest.raises(ValueError, match=r"lacks key\(s\) \['true_embedding'\]"):
    prediction_cache.load_predictions(tmp_path, 'test', 1)
  np.savez(path, ids=np.array([], str), predicted_embedding=np.ones((0, 3)),
           true_embedding=np.ones((0, 3)))
  with pytest.raises(ValueError, match='empty'):
    prediction_cache.load_predictions(tmp_path, 'test', 1)
  np.savez(path, ids=np.array(['a']), predicted_embedding=np.ones((1, 3)),
           true_embedding=np.ones((1, 4)))
  with pytest.raises(ValueError, match=r'true embeddings have shape \(1, 4\)'):
    prediction_cache.load_predictions(tmp_path, 'test', 1)
