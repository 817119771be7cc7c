"""Ensembles: combining runs, fitting weights on validation, the command's
function on saved predictions, and clear errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from reverse_sd import ensemble
from reverse_sd import prediction_cache


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _targets(num=300, dim=16, seed=0):
  return _unit(np.random.default_rng(seed).normal(size=(num, dim)))


def _noisy(targets, scale, seed):
  noise = np.random.default_rng(seed).normal(size=targets.shape)
  return _unit(targets + scale * noise)


def _cosine(a, b):
  return float(np.mean(np.sum(_unit(a) * _unit(b), axis=1)))


def test_combine_is_the_renormalised_weighted_mean():
  targets = _targets(num=5, dim=4)
  a, b = _noisy(targets, 1.0, 1) * 3, _noisy(targets, 1.0, 2)  # a: not unit.
  combined = ensemble.combine([a, b], [2.0, 6.0])  # Rescaled to 0.25, 0.75.
  expected = _unit(0.25 * _unit(a) + 0.75 * _unit(b))
  np.testing.assert_allclose(combined, expected, atol=1e-6)
  np.testing.assert_allclose(ensemble.combine([a, b], [1, 0]), _unit(a),
                             atol=1e-6)


def test_pure_noise_run_gets_no_weight():
  targets = _targets()
  good = _noisy(targets, 0.7, seed=1)
  noise = _unit(np.random.default_rng(2).normal(size=targets.shape))
  weights = ensemble.fit_weights([noise, good], targets)
  assert weights[0] < 0.03, weights
  np.testing.assert_allclose(weights.sum(), 1.0)
  assert np.all(weights >= 0)
  # Deterministic.
  np.testing.assert_array_equal(weights,
                                ensemble.fit_weights([noise, good], targets))


def test_equally_good_runs_share_the_weight_and_beat_each_member():
  targets = _targets()
  runs = [_noisy(targets, 0.8, seed) for seed in (1, 2)]
  weights = ensemble.fit_weights(runs, targets)
  np.testing.assert_allclose(weights, [0.5, 0.5], atol=0.1)
  mixed = ensemble.combine(runs, weights)
  assert _cosine(mixed, targets) > max(_cosine(r, targets) for r in runs)


def test_project_to_simplex():
  for vector, expected in [([0.2, 0.8], [0.2, 0.8]),
                           ([1.0, 1.0], [0.5, 0.5]),
                           ([2.0, -1.0, 0.0], [1.0, 0.0, 0.0]),
                           ([0.5, 0.5, 0.5], [1 / 3] * 3)]:
    np.testing.assert_allclose(
        ensemble.project_to_simplex(jnp.asarray(vector, jnp.float32)),
        expected, atol=1e-6, err_msg=str(vector))


def test_bad_inputs_give_clear_errors():
  targets = _targets(num=6, dim=4)
  with pytest.raises(ValueError, match='Got 1 ensemble weight'):
    ensemble.combine([targets, targets], [1.0])
  with pytest.raises(ValueError, match='>= 0'):
    ensemble.combine([targets, targets], [1.0, -0.5])
  with pytest.raises(ValueError, match='sum to 0'):
    ensemble.combine([targets, targets], [0, 0])
  with pytest.raises(ValueError,
                     match=r'Run 1 predictions have shape \(6, 3\)'):
    ensemble.combine([targets, targets[:, :3]], [1, 1])
  with pytest.raises(ValueError, match='predictions of run 0: empty'):
    ensemble.fit_weights([targets[:0]], targets[:0])
  with pytest.raises(ValueError, match='either --weights or --fit_weights'):
    ensemble.choose_weights(2, weights=[1, 1], fit=True)
  with pytest.raises(ValueError, match='--weights=.*numbers'):
    prediction_cache.parse_floats('0.5,x', 'weights')


def _write_fake_run(workdir, seed, *, size=20, ids_prefix='ex', step=3):
  targets = _targets(num=size, dim=8)
  for split in ('validation', 'test'):
    prediction_cache.save_predictions(
        prediction_cache.Predictions(
            split, step, np.array([f'{ids_prefix}{i}' for i in range(size)]),
            _noisy(targets, 0.8, seed + 1), targets),
        prediction_cache.predictions_path(workdir, split, step))


def test_run_ensemble_on_saved_predictions(tmp_path):
  runs = [tmp_path / 'a', tmp_path / 'b']
  for seed, workdir in enumerate(runs):
    _write_fake_run(workdir, seed)
  summary = ensemble.run_ensemble([str(r) for r in runs], splits=['test'],
                                  fit=True)
  out_dir = tmp_path / 'ensemble-a-b'
  assert summary['output_dir'] == str(out_dir)
  record = json.loads((out_dir / 'ensemble_test.json').read_text())
  assert record['weights_chosen'] == 'fitted on validation'
  assert record['steps'] == [3, 3] and len(record['members']) == 2
  np.testing.assert_allclose(sum(record['weights']), 1.0)
  assert record['metrics']['cosine'] > max(m['cosine']
                                           for m in record['members'])
  with np.load(out_dir / 'ensemble_test.npz') as data:
    assert data['predicted_embedding'].shape == (20, 8)


def test_runs_on_different_examples_are_refused(tmp_path):
  _write_fake_run(tmp_path / 'a', 0)
  _write_fake_run(tmp_path / 'b', 1, ids_prefix='other')
  with pytest.raises(ValueError, match='predict different examples'):
    ensemble.run_ensemble([str(tmp_path / 'a'), str(tmp_path / 'b')],
                          splits=['test'])
