"""Tests of reverse_sd/domain_adaptation.py on fake runs.

The runs are folders holding only prediction caches written by hand in the
format of `reverse_sd.prediction_cache` (WORKDIR/predictions/<split>_step<N>.npz),
so no model is restored or run.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from reverse_sd import dakl
from reverse_sd import domain_adaptation as da
from reverse_sd import ensemble

REPO = pathlib.Path(__file__).resolve().parent.parent

_PROVENANCE = {'date': '2025-01-01 00:00 UTC',
               'machine': 'test: x86_64, 2 cores',
               'command': 'python -m reverse_sd.domain_adaptation --sweep_dir=s'}
_SIZES = {'train': 40, 'validation': 16, 'test': 18, 'test_shifted': 18}
_DIM = 12
_STEP = 30
_NUM_CENTROIDS = 8
_SEEDS = (0, 1, 2)


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_cache(workdir, split, ids, predicted, targets):
  """One prediction cache file, exactly as predictions.save_predictions
  writes it."""
  folder = workdir / 'predictions'
  folder.mkdir(parents=True, exist_ok=True)
  np.savez(folder / f'{split}_step{_STEP}.npz', ids=ids.astype(str),
           predicted_embedding=predicted, true_embedding=targets,
           step=np.int64(_STEP), split=np.asarray(split))


def _make_sweep(tmp_path, groups=('baseline', 'vocab'), seeds=_SEEDS):
  """sweep_dir/<group>_seed<s> with caches of all splits; returns the sweep
  dir and {(group, seed): {split: (predicted, targets)}}."""
  sweep_dir = tmp_path / 'sweep'
  written = {}
  for seed in seeds:
    rng = np.random.default_rng(100 + seed)
    # The data set is shared by the runs of a seed; only predictions differ.
    data = {split: (np.array([f'{split}-{i}' for i in range(n)]),
                    _unit(rng.normal(size=(n, _DIM))))
            for split, n in _SIZES.items()}
    shift = rng.normal(size=_DIM)
    for g, group in enumerate(groups):
      noise_rng = np.random.default_rng(1000 * seed + g)
      for split, (ids, targets) in data.items():
        noise = noise_rng.normal(scale=0.8, size=targets.shape)
        offset = 0.7 * shift if split == 'test_shifted' else 0.0
        predicted = _unit(targets + noise + offset)
        _write_cache(sweep_dir / f'{group}_seed{seed}', split, ids,
                     predicted, targets)
        written.setdefault((group, seed), {})[split] = (predicted, targets)
  return sweep_dir, written


def _cosine(predicted, targets):
  return float(np.mean(np.sum(predicted.astype(np.float64) * targets,
                              axis=1)))


@pytest.fixture(scope='module')
def fixed_table(tmp_path_factory):
  """The table with given gamma and alpha, and the cache contents."""
  sweep_dir, written = _make_sweep(tmp_path_factory.mktemp('fixed'))
  settings = da.Settings(num_centroids=_NUM_CENTROIDS, gamma=4.0, alpha=0.5)
  markdown, data = da.domain_adaptation_table(sweep_dir, settings,
                                              provenance=_PROVENANCE)
  return markdown, data, written, settings


def test_table_has_every_row_split_and_seed(fixed_table):
  markdown, data, _, _ = fixed_table
  keys = [row.key for row in da.ROWS]
  assert keys == ['single', 'ensemble', 'ensemble_dakl',
                  'ensemble_dakl_source_only', 'single_dakl']
  assert list(data['summary']) == keys
  for key in keys:
    for split in ('test', 'test_shifted'):
      for metric in ('cosine', 'recall@5'):
        summary = data['summary'][key][split][metric]
        assert summary['n'] == 3, (key, split, metric, summary)
        assert np.isfinite(summary['mean']) and summary['std'] >= 0
  assert [r['seed'] for r in data['seeds']] == list(_SEEDS)
  table = markdown.split('## Rows')[0]
  header = ('| row | test cosine | test recall@5 | test_shifted cosine | '
            'test_shifted recall@5 |')
  assert header in table, table
  for i, row in enumerate(da.ROWS, start=1):
    assert f'| {i}. {row.label} |' in table, (row.label, table)
  for text in ('Made 2025-01-01 00:00 UTC on test: x86_64, 2 cores by:',
               _PROVENANCE['command'], 'k = 8 requested',
               'gamma = 4, alpha = 0.5 (given)', 'peak resident memory',
               '## Per seed', '## Time and memory'):
    assert text in markdown, text
  for record in data['seeds']:
    assert record['steps']['vocab'] == dict.fromkeys(_SIZES, _STEP)
    assert record['source_points']['ensemble']['num_source'] == 8
    for key in ('ensemble_dakl', 'ensemble_dakl_source_only', 'single_dakl'):
      assert record['hyperparameters'][key]['gamma'] == 4.0
      assert record['hyperparameters'][key]['alpha'] == 0.5
    for key in ('source_points/ensemble', 'source_points/single',
                'dakl_fit/ensemble_dakl/test_shifted', 'predictions'):
      assert record['seconds'][key] >= 0, key
  assert data['peak_rss_mb'] > 0


def test_single_model_cell_is_mean_and_sample_std_over_seeds(fixed_table):
  markdown, data, written, _ = fixed_table
  per_seed = [_cosine(*written[('baseline', seed)]['test']) for seed in _SEEDS]
  mean, std = np.mean(per_seed), np.std(per_seed, ddof=1)
  summary = data['summary']['single']['test']['cosine']
  np.testing.assert_allclose(summary['values'], per_seed, rtol=1e-6)
  np.testing.assert_allclose([summary['mean'], summary['std']], [mean, std],
                             rtol=1e-6)
  assert f'| 1. single model | {mean:.4f} ± {std:.4f} |' in markdown, markdown


def test_ensemble_dakl_uses_ensemble_train_centroids(fixed_table):
  """Row 3 of seed 1 on test_shifted, recomputed from the caches."""
  _, data, written, settings = fixed_table
  runs = [written[(group, 1)] for group in ('baseline', 'vocab')]
  weights = ensemble.fit_weights([r['validation'][0] for r in runs],
                                 runs[0]['validation'][1])
  record = data['seeds'][1]
  np.testing.assert_allclose(
      [record['ensemble_weights'][g] for g in ('baseline', 'vocab')], weights)
  features = {split: ensemble.combine([r[split][0] for r in runs], weights)
              for split in _SIZES}
  source_x, source_y, _ = dakl.make_source_points(
      features['train'], runs[0]['train'][1], _NUM_CENTROIDS, seed=1)
  adapted = dakl.fit_predict(source_x, source_y, features['test_shifted'],
                             gamma=settings.gamma, alpha=settings.alpha)
  got = record['metrics']['ensemble_dakl']['test_shifted']['cosine']
  np.testing.assert_allclose(got, _cosine(adapted,
                                          runs[0]['test_shifted'][1]),
                             rtol=1e-5)
  got = record['metrics']['ensemble']['test_shifted']['cosine']
  np.testing.assert_allclose(got, _cosine(features['test_shifted'],
                                          runs[0]['test_shifted'][1]),
                             rtol=1e-5)


def test_select_on_validation_records_choice_per_seed(tmp_path):
  sweep_dir, _ = _make_sweep(tmp_path, seeds=(0, 1))
  settings = da.Settings(seeds=(0, 1), num_centroids=_NUM_CENTROIDS,
                         select_on_validation=True, gammas=(1.0, 10.0),
                         alphas=(0.1, 10.0))
  markdown, data = da.domain_adaptation_table(sweep_dir, settings,
                                              provenance=_PROVENANCE)
  for record in data['seeds']:
    for key in ('ensemble_dakl', 'ensemble_dakl_source_only', 'single_dakl'):
      chosen = record['hyperparameters'][key]
      assert chosen['chosen'] == 'selected on validation'
      assert len(chosen['grid']) == 4
      best = max(chosen['grid'], key=lambda g: g['validation_cosine'])
      assert (chosen['gamma'], chosen['alpha']) == (best['gamma'],
                                                    best['alpha'])
      assert record['seconds'][f'selection/{key}'] >= 0
  assert 'never on test or test_shifted' in markdown
  assert 'over seeds 0, 1 (n=2)' in markdown


def test_missing_run_dir_is_named(tmp_path):
  sweep_dir, _ = _make_sweep(tmp_path, seeds=(0, 1))
  settings = da.Settings(seeds=(0, 1, 2), num_centroids=_NUM_CENTROIDS)
  with pytest.raises(FileNotFoundError) as info:
    da.compute_table(sweep_dir, settings)
  message = str(info.value)
  assert str(sweep_dir / 'baseline_seed2') in message, message
  assert str(sweep_dir / 'vocab_seed2') in message, message
  assert 'seed0' not in message and '--seeds' in message, message
  with pytest.raises(FileNotFoundError, match='no such directory'):
    da.compute_table(tmp_path / 'nowhere', settings)


def test_bad_settings_and_output_are_rejected(tmp_path):
  with pytest.raises(ValueError, match='--seeds'):
    da.Settings(seeds=(0, 0)).check()
  with pytest.raises(ValueError, match='--ensemble'):
    da.Settings(ensemble=('baseline',)).check()
  with pytest.raises(ValueError, match='--alphas'):
    da.Settings(alphas=(1.0, -1.0)).check()
  with pytest.raises(ValueError, match=r'\.md path'):
    da.check_output(tmp_path / 'table.json')


def test_command_writes_markdown_and_json(tmp_path):
  sweep_dir, _ = _make_sweep(tmp_path, seeds=(0, 1))
  output = tmp_path / 'results' / 'table.md'
  command = [sys.executable, '-m', 'reverse_sd.domain_adaptation',
             f'--sweep_dir={sweep_dir}', f'--output={output}', '--seeds=0,1',
             f'--num_centroids={_NUM_CENTROIDS}', '--gamma=3', '--alpha=2']
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  markdown = output.read_text()
  data = json.loads(output.with_suffix('.json').read_text())
  assert f'--output={output}' in markdown
  assert data['settings']['seeds'] == [0, 1]
  assert data['settings']['gamma'] == 3.0
  cell = data['summary']['ensemble_dakl']['test']['cosine']
  assert f'{cell["mean"]:.4f} ± {cell["std"]:.4f}' in markdown
  # A missing run: a one-line error naming it, nothing written.
  missing = tmp_path / 'missing.md'
  proc = subprocess.run([*command[:4], f'--output={missing}', '--seeds=0,7'],
                        cwd=REPO, capture_output=True, text=True, check=False)
  assert proc.returncode != 0
  assert 'domain_adaptation: error: Run directories not found' in proc.stderr
  assert str(sweep_dir / 'vocab_seed7') in proc.stderr
  assert 'Traceback' not in proc.stderr and not missing.exists()
