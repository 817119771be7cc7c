"""DA-KL: the kernel, kernel ridge on the kernel representation, k-means,
centroid labels, the command, and clear errors for bad input."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from reverse_sd import dakl
from reverse_sd import prediction_cache

REPO = pathlib.Path(__file__).resolve().parents[1]


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_kernel(a, b, gamma):
  """float64 NumPy K(a, b) = exp(-gamma (1 - cos) / 2)."""
  cos = _unit(a.astype(np.float64)) @ _unit(b.astype(np.float64)).T
  return np.exp(-gamma * (1.0 - cos) / 2.0)


def _reference_fit_predict(source_x, source_y, target_x, gamma, alpha,
                           use_target=True):
  """The closed form with the full representation Phi, in float64."""
  points = np.concatenate([source_x, target_x]) if use_target else source_x
  phi_s = _reference_kernel(source_x, points, gamma)
  phi_t = _reference_kernel(target_x, points, gamma)
  coefficients = np.linalg.solve(phi_s @ phi_s.T + alpha * np.eye(len(phi_s)),
                                 source_y.astype(np.float64))
  return _unit(phi_t @ phi_s.T @ coefficients)


def _problem(seed=0, num_source=12, num_target=9, dim=6, label_dim=5):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_source, dim)).astype(np.float32),
          rng.normal(size=(num_source, label_dim)).astype(np.float32),
          rng.normal(size=(num_target, dim)).astype(np.float32))


def test_kernel_matches_float64_numpy_reference():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(5, 8)).astype(np.float32) * 3  # Not unit rows.
  b = rng.normal(size=(7, 8)).astype(np.float32)
  expected = _reference_kernel(a, b, 4.0)
  np.testing.assert_allclose(np.asarray(dakl.cosine_kernel(a, b, 4.0)),
                             expected, atol=1e-6)
  for chunk_size in (2, 5, 100):
    np.testing.assert_allclose(
        dakl.kernel_matrix(a, b, 4.0, chunk_size=chunk_size), expected,
        atol=1e-6, err_msg=f'chunk_size={chunk_size}')
  # Identical directions give 1, opposite ones exp(-gamma).
  same = dakl.kernel_matrix(a[:1], np.stack([a[0] * 2, -a[0]]), 4.0)
  np.testing.assert_allclose(same, [[1.0, np.exp(-4.0)]], rtol=1e-5)


@pytest.mark.parametrize('use_target', [True, False])
def test_fit_predict_matches_closed_form(use_target):
  source_x, source_y, target_x = _problem()
  expected = _reference_fit_predict(source_x, source_y, target_x, 3.0, 0.1,
                                    use_target)
  got = dakl.fit_predict(source_x, source_y, target_x, gamma=3.0, alpha=0.1,
                         use_target=use_target, chunk_size=5)
  assert got.shape == (9, 5) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got, expected, atol=2e-4)


def test_chunked_and_unchunked_agree_and_alphas_share_the_work():
  source_x, source_y, target_x = _problem(seed=2, num_source=20,
                                          num_target=13)
  whole = dakl.fit_predict(source_x, source_y, target_x, gamma=10.0,
                           alpha=0.5, chunk_size=10_000)
  for chunk_size in (1, 7):
    np.testing.assert_allclose(
        dakl.fit_predict(source_x, source_y, target_x, gamma=10.0, alpha=0.5,
                         chunk_size=chunk_size), whole, atol=1e-5,
        err_msg=f'chunk_size={chunk_size}')
  grid = dakl.fit_predict_alphas(source_x, source_y, target_x, gamma=10.0,
                                 alphas=(0.05, 0.5, 5.0), chunk_size=7)
  np.testing.assert_allclose(grid[1], whole, atol=1e-5)
  np.testing.assert_allclose(
      grid[2], dakl.fit_predict(source_x, source_y, target_x, gamma=10.0,
                                alpha=5.0), atol=1e-5)


def test_label_centroids_takes_the_nearest_training_prediction():
  train = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 2]]  # Row 4 ties row 2.
  targets = np.arange(20, dtype=np.float32).reshape(5, 4) + 1
  centroids = np.array([[0.1, 0, 1, 0], [1, 0.2, 0, 0], [0, 0, 0.3, 5]],
                       np.float32)
  for chunk_size in (1, 2, 1024):  # k-means assigns with the same code.
    labels, rows = dakl.label_centroids(centroids, train, targets,
                                        chunk_size=chunk_size)
    np.testing.assert_array_equal(rows, [2, 0, 3])  # Tie: the lower index.
    np.testing.assert_array_equal(labels, targets[[2, 0, 3]])


def _clusters(seed=0, per_cluster=20, dim=8):
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(3, dim)))
  points = np.concatenate(
      [c + 0.1 * rng.normal(size=(per_cluster, dim)) for c in centres])
  return points.astype(np.float32), np.repeat(np.arange(3), per_cluster)


# One static configuration (k=3, 6 iterations, chunks of 7) shared by the
# tests below, so that k-means compiles as few times as possible.
_KMEANS = dict(seed=3, num_iterations=6, chunk_size=7)


@pytest.mark.parametrize('init', ['kmeans++', 'random'])
def test_kmeans_is_deterministic_and_reduces_inertia(init):
  points, truth = _clusters()
  first = dakl.kmeans(points, 3, init=init, **_KMEANS)
  again = dakl.kmeans(points, 3, init=init, **_KMEANS)
  np.testing.assert_array_equal(first.centroids, again.centroids)
  np.testing.assert_array_equal(first.assignment, again.assignment)
  assert first.inertia.shape == (7,)
  assert np.all(np.diff(first.inertia) <= 1e-4), first.inertia
  assert first.inertia[-1] < first.inertia[0], first.inertia
  np.testing.assert_allclose(np.linalg.norm(first.centroids, axis=1), 1.0,
                             atol=1e-5)
  if init == 'kmeans++':  # D^2 seeding finds the three separated clusters.
    pairs = set(zip(truth.tolist(), first.assignment.tolist()))
    assert len(pairs) == 3, pairs


def test_make_source_points():
  points, _ = _clusters()
  targets = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
  source_x, source_y, info = dakl.make_source_points(points, targets, 3,
                                                     **_KMEANS)
  assert source_x.shape == (3, 8) and source_y.shape == (3, 5)
  assert info['num_source'] == 3 and info['source'] == 'k-means centroids'
  # Every label is some training example's true embedding.
  assert all(any(np.array_equal(row, t) for t in targets) for row in source_y)
  source_x, source_y, info = dakl.make_source_points(points, targets, 100)
  assert info['source'] == 'training predictions'
  np.testing.assert_array_equal(source_y, targets)


def test_bad_inputs_give_clear_errors(tmp_path):
  source_x, source_y, target_x = _problem()
  with pytest.raises(ValueError, match='6-d embeddings but target_x 4-d'):
    dakl.fit_predict(source_x, source_y, target_x[:, :4], gamma=1.0,
                     alpha=1.0)
  with pytest.raises(ValueError, match='target_x: empty'):
    dakl.fit_predict(source_x, source_y, target_x[:0], gamma=1.0, alpha=1.0)
  with pytest.raises(ValueError, match='source_y has 11 rows for 12'):
    dakl.fit_predict(source_x, source_y[:11], target_x, gamma=1.0, alpha=1.0)
  with pytest.raises(ValueError, match='alphas\\[0\\]=0'):
    dakl.fit_predict(source_x, source_y, target_x, gamma=1.0, alpha=0)
  zero = target_x.copy()
  zero[3] = 0
  with pytest.raises(ValueError, match='target_x: row 3 is all zeros'):
    dakl.fit_predict(source_x, source_y, zero, gamma=1.0, alpha=1.0)
  with pytest.raises(ValueError, match='num_clusters=13'):
    dakl.kmeans(source_x, 13)
  with pytest.raises(ValueError, match='centroids has 6-d embeddings'):
    dakl.label_centroids(source_x, target_x[:, :4], source_y[:9])
  # A run without saved predictions: the path and the command that makes it.
  with pytest.raises(FileNotFoundError, match=(
      r'predictions/test_shifted_step<N>\.npz.*python -m '
      r'reverse_sd\.prediction_cache --workdir=.* --splits=test_shifted')):
    prediction_cache.load_predictions(tmp_path, 'test_shifted')
  with pytest.raises(FileNotFoundError, match='train'):
    dakl.run_dakl([str(tmp_path)], split='test_shifted',
                  compute_missing=False)
  # The command's path: no checkpoints and nothing saved.
  with pytest.raises(FileNotFoundError,
                     match='python -m reverse_sd.prediction_cache'):
    dakl.run_dakl([str(tmp_path / 'none')], split='test')
  with pytest.raises(ValueError, match='--split=train'):
    dakl.run_dakl([str(tmp_path)], split='train')


def _write_fake_run(workdir, seed, splits=('train', 'validation',
                                           'test_shifted'), step=5):
  """Saved predictions of a run that never trained: targets + noise. The
  training split has the shape of `_clusters` (k-means compiles once)."""
  rng = np.random.default_rng(0)  # Same data set for every run.
  noise = np.random.default_rng(seed)
  for split, size in zip(splits, (60, 15, 12)):
    targets = _unit(rng.normal(size=(size, 8))).astype(np.float32)
    predicted = _unit(targets + 0.5 * noise.normal(size=targets.shape))
    prediction_cache.save_predictions(
        prediction_cache.Predictions(split, step, np.array(
            [f'{split}-{i}' for i in range(size)]), predicted.astype(
                np.float32), targets),
        prediction_cache.predictions_path(workdir, split, step))


def test_run_dakl_on_saved_predictions_of_an_ensemble(tmp_path):
  runs = [tmp_path / 'a', tmp_path / 'b']
  for seed, workdir in enumerate(runs):
    _write_fake_run(workdir, seed)
  record = dakl.run_dakl([str(r) for r in runs], split='test_shifted',
                         fit_weights=True, num_centroids=3, select=True,
                         gammas=(1.0, 10.0), alphas=(0.1, 1.0),
                         kmeans_iterations=_KMEANS['num_iterations'],
                         seed=_KMEANS['seed'],
                         chunk_size=_KMEANS['chunk_size'])
  out_dir = tmp_path / 'ensemble-a-b' / 'dakl'
  assert record['output'] == str(out_dir / 'dakl_test_shifted.json')
  saved = json.loads((out_dir / 'dakl_test_shifted.json').read_text())
  assert saved['num_source'] == 3 and len(saved['selection']) == 4
  assert (saved['gamma'], saved['alpha']) in {
      (r['gamma'], r['alpha']) for r in saved['selection']}
  for which in ('adapted', 'unadapted'):
    assert set(saved['metrics'][which]) == {
        'cosine', 'recall@1', 'recall@5', 'recall@10', 'num_examples'}
  with np.load(out_dir / 'dakl_test_shifted.npz') as data:
    assert data['adapted_embedding'].shape == (12, 8)
    assert data['ids'][0] == 'test_shifted-0'


def test_command_line(tmp_path):
  _write_fake_run(tmp_path / 'run', seed=0)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'reverse_sd.dakl', f'--workdirs={tmp_path}/run',
       '--split=test_shifted', '--num_centroids=100', '--source_only',
       '--alpha=0.5', f'--output_dir={tmp_path}/out'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout)
  assert summary['num_source'] == 60  # k >= N: the training predictions.
  assert summary['alpha'] == 0.5
  assert (tmp_path / 'out' / 'dakl_test_shifted_source_only.npz').is_file()
