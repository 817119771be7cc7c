r"""Weighted ensembles of several runs' predicted embeddings.

The ensemble's prediction is the renormalised weighted mean of the runs'
L2-normalised predictions:

  ensemble(x) = normalise(sum_r w_r * normalise(pred_r(x))),

with weights w on the simplex (w_r >= 0, sum_r w_r = 1). Given weights are
rescaled to sum to 1. Fitted weights (`fit_weights`) maximise the mean cosine
to the true embeddings on the validation split by projected gradient ascent:
start from uniform weights, take `num_steps` steps of size `learning_rate`
along the gradient, project onto the simplex after each step (Duchi et al.,
2008) and keep the best iterate seen. There is no randomness, so the weights
are a deterministic function of the validation predictions. The objective is
smooth and cheap (R x N x D numbers), so a few hundred full-batch steps
suffice for any number of runs.

  python -m reverse_sd.ensemble --workdirs=RUN_A,RUN_B [--weights=0.7,0.3 | \
      --fit_weights] [--splits=test,test_shifted] [--output_dir=DIR]

Missing predictions are computed and cached in each run
(`reverse_sd.prediction_cache`). For each split it writes `ensemble_<split>.npz`
('ids', 'predicted_embedding', 'true_embedding') and `ensemble_<split>.json`
(weights, runs and steps; cosine and recall@1/5/10 of the ensemble and of
each run) into --output_dir, by default `<parent of RUN_A>/ensemble-<names>`.
Without --weights or --fit_weights the weights are uniform.
"""

from collections.abc import Sequence
import functools
import json
import logging
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from reverse_sd import prediction_cache
from reverse_sd.ops.cpu import tuning

DEFAULT_NUM_STEPS = 300
DEFAULT_LEARNING_RATE = 0.5
_EPS = 1e-12


def normalize(x_NxD: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
  x_NxD = np.asarray(x_NxD, np.float32)
  norms = np.linalg.norm(x_NxD, axis=1, keepdims=True)
  return x_NxD / np.maximum(norms, _EPS)


def _stack(predictions: Sequence[np.ndarray]) -> np.ndarray:
  """[R, N, D] of the runs' normalised predictions; checks the shapes."""
  if not predictions:
    raise ValueError('No predictions to ensemble: expected at least one run.')
  for r, preds in enumerate(predictions):
    prediction_cache.check_embeddings(preds, f'predictions of run {r}')
    if np.shape(preds) != np.shape(predictions[0]):
      raise ValueError(f'Run {r} predictions have shape {np.shape(preds)}, '
                       f'run 0 {np.shape(predictions[0])}; the runs must '
                       'predict the same examples with the same size.')
  return np.stack([normalize(p) for p in predictions])


def check_weights(weights: Sequence[float], num_runs: int) -> np.ndarray:
  """`weights` as float64 summing to 1; raises ValueError when unusable."""
  weights = np.asarray(weights, np.float64)
  if weights.shape != (num_runs,):
    raise ValueError(f'Got {weights.size} ensemble weight(s) {weights.tolist()}'
                     f' for {num_runs} run(s).')
  if not np.all(np.isfinite(weights)) or np.any(weights < 0):
    raise ValueError(f'Ensemble weights must be finite and >= 0; got '
                     f'{weights.tolist()}.')
  if weights.sum() <= 0:
    raise ValueError(f'Ensemble weights sum to 0: {weights.tolist()}.')
  return weights / weights.sum()


def combine(predictions: Sequence[np.ndarray],
            weights: Sequence[float]) -> np.ndarray:
  """The renormalised weighted mean of the runs' normalised predictions.

  Args:
    predictions: R arrays [N, D], one per run, rows in the same order.
    weights: R non-negative weights (rescaled to sum to 1).

  Returns:
    [N, D] float32 unit rows.
  """
  stack_RxNxD = _stack(predictions)
  weights = check_weights(weights, len(stack_RxNxD))
  mixed = np.einsum('r,rnd->nd', weights, stack_RxNxD.astype(np.float64))
  return normalize(mixed)


def project_to_simplex(v_R: jax.Array) -> jax.Array:
  """Euclidean projection onto {w : w >= 0, sum(w) = 1} (sort-based)."""
  u = jnp.sort(v_R)[::-1]
  cumsum = jnp.cumsum(u)
  k = jnp.arange(1, v_R.shape[0] + 1, dtype=v_R.dtype)
  # The condition holds on a prefix of the sorted values.
  rho = jnp.sum(u - (cumsum - 1) / k > 0) - 1
  theta = (cumsum[rho] - 1) / (rho + 1).astype(v_R.dtype)
  return jnp.maximum(v_R - theta, 0)


def _mean_cosine(weights_R, stack_RxNxD, targets_NxD):
  mixed = jnp.einsum('r,rnd->nd', weights_R, stack_RxNxD)
  mixed = mixed / jnp.maximum(jnp.linalg.norm(mixed, axis=1, keepdims=True),
                              _EPS)
  return jnp.mean(jnp.sum(mixed * targets_NxD, axis=1))


@functools.partial(jax.jit, static_argnames=('num_steps',))
def _fit(stack_RxNxD, targets_NxD, learning_rate, num_steps):
  value_and_grad = jax.value_and_grad(_mean_cosine)
  num_runs = stack_RxNxD.shape[0]
  uniform = jnp.full((num_runs,), 1.0 / num_runs, stack_RxNxD.dtype)

  def body(_, carry):
    weights, best_weights, best_score = carry
    score, grad = value_and_grad(weights, stack_RxNxD, targets_NxD)
    better = score > best_score
    best_weights = jnp.where(better, weights, best_weights)
    best_score = jnp.where(better, score, best_score)
    weights = project_to_simplex(weights + learning_rate * grad)
    return weights, best_weights, best_score

  weights, best_weights, best_score = jax.lax.fori_loop(
      0, num_steps, body, (uniform, uniform, jnp.array(-jnp.inf,
                                                        uniform.dtype)))
  final = _mean_cosine(weights, stack_RxNxD, targets_NxD)
  return jnp.where(final > best_score, weights, best_weights)


def fit_weights(predictions: Sequence[np.ndarray], targets_NxD: np.ndarray, *,
                num_steps: int = DEFAULT_NUM_STEPS,
                learning_rate: float = DEFAULT_LEARNING_RATE) -> np.ndarray:
  """Simplex weights maximising the ensemble's mean cosine to `targets_NxD`.

  Projected gradient ascent from uniform weights, keeping the best iterate
  (see the module docstring). Deterministic.

  Args:
    predictions: R arrays [N, D] (e.g. validation predictions of R runs).
    targets_NxD: the true embeddings of the same rows.
    num_steps: gradient steps.
    learning_rate: step size.

  Returns:
    [R] float64 weights, >= 0, summing to 1.
  """
  stack_RxNxD = _stack(predictions)
  if np.shape(targets_NxD) != stack_RxNxD.shape[1:]:
    raise ValueError(f'True embeddings have shape {np.shape(targets_NxD)}, '
                     f'predictions {stack_RxNxD.shape[1:]}.')
  if num_steps < 1 or learning_rate <= 0:
    raise ValueError(f'num_steps={num_steps} and learning_rate='
                     f'{learning_rate} must be positive.')
  weights = _fit(jnp.asarray(stack_RxNxD), jnp.asarray(normalize(targets_NxD)),
                 jnp.float32(learning_rate), num_steps=num_steps)
  # Exact zeros stay zero; the rest is rescaled against float32 drift.
  return check_weights(np.maximum(np.asarray(weights, np.float64), 0),
                       len(stack_RxNxD))


def choose_weights(num_runs: int, *, weights: Sequence[float] | None = None,
                   fit: bool = False,
                   validation: Sequence[prediction_cache.Predictions] = ()
                   ) -> tuple[np.ndarray, str]:
  """The ensemble weights and how they were chosen ('given', 'fitted on
  validation', 'uniform'; a single run gets weight 1, 'single run')."""
  if weights is not None and fit:
    raise ValueError('Give either --weights or --fit_weights, not both.')
  if weights is not None:
    return check_weights(weights, num_runs), 'given'
  if num_runs == 1:
    return np.ones(1), 'single run'
  if fit:
    if len(validation) != num_runs:
      raise ValueError(f'Fitting weights needs validation predictions of all '
                       f'{num_runs} runs; got {len(validation)}.')
    return (fit_weights([p.predicted for p in validation],
                        validation[0].targets), 'fitted on validation')
  return np.full(num_runs, 1.0 / num_runs), 'uniform'


def default_output_dir(workdirs: Sequence[str | os.PathLike[str]],
                       subdir: str) -> pathlib.Path:
  """WORKDIR/subdir for one run; for several,
  <parent of the first>/ensemble-<run names joined by '-'>/subdir."""
  paths = [pathlib.Path(w).resolve() for w in workdirs]
  if len(paths) == 1:
    return paths[0] / subdir
  name = 'ensemble-' + '-'.join(p.name for p in paths)
  return paths[0].parent / name / subdir


def run_ensemble(workdirs: Sequence[str], *, splits: Sequence[str],
                 weights: Sequence[float] | None = None,
                 fit: bool = False,
                 output_dir: str | os.PathLike[str] = '') -> dict:
  """Predicts (or loads) every run's splits, combines, scores and writes."""
  needed = list(dict.fromkeys([*(['validation'] if fit else []), *splits]))
  runs = prediction_cache.load_aligned(workdirs, needed)
  chosen, how = choose_weights(len(workdirs), weights=weights, fit=fit,
                               validation=runs.get('validation', ()))
  output_dir = pathlib.Path(output_dir or default_output_dir(workdirs, ''))
  summary = {'workdirs': [str(w) for w in workdirs],
             'steps': [p.step for p in runs[needed[0]]],
             'weights': chosen.tolist(), 'weights_chosen': how, 'splits': {}}
  for split in splits:
    members = runs[split]
    combined = combine([p.predicted for p in members], chosen)
    targets = members[0].targets
    record = dict(summary, split=split,
                  metrics=prediction_cache.embedding_metrics(combined, targets),
                  members=[prediction_cache.embedding_metrics(p.predicted,
                                                             targets)
                           for p in members])
    del record['splits']
    prediction_cache.atomic_write(
        output_dir / f'ensemble_{split}.npz',
        lambda f, c=combined, m=members[0]: np.savez(
            f, ids=m.ids, predicted_embedding=c, true_embedding=m.targets))
    prediction_cache.write_json(output_dir / f'ensemble_{split}.json', record)
    summary['splits'][split] = record['metrics']
    logging.info('Ensemble on %s: cosine %.4f (members %s).', split,
                 record['metrics']['cosine'],
                 [round(m['cosine'], 4) for m in record['members']])
  summary['output_dir'] = str(output_dir)
  return summary


def _main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f'ensemble: unexpected arguments {argv[1:]}')
  tuning.tune_process()
  try:
    workdirs = prediction_cache.parse_list(_FLAGS.workdirs, 'workdirs')
    weights = None
    if _FLAGS.weights:
      weights = prediction_cache.parse_floats(_FLAGS.weights, 'weights')
    summary = run_ensemble(
        workdirs, splits=prediction_cache.parse_list(_FLAGS.splits, 'splits'),
        weights=weights, fit=_FLAGS.fit_weights, output_dir=_FLAGS.output_dir)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'ensemble: error: {e}') from e
  print(json.dumps(summary, indent=2, default=float))
  sys.stdout.flush()


if __name__ == '__main__':
  from reverse_sd import cli as _cli  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string('workdirs', None, 'Comma-separated trained runs.',
                       required=True)
  _flags.DEFINE_string('weights', '', 'Comma-separated weights, one per run '
                       '(rescaled to sum to 1). Default: uniform.')
  _flags.DEFINE_bool('fit_weights', False,
                     'Fit the weights on the validation split.')
  _flags.DEFINE_string('splits', 'test,test_shifted',
                       'Comma-separated splits to ensemble.')
  _flags.DEFINE_string('output_dir', '', 'Default: WORKDIR for one run, '
                       '<parent>/ensemble-<names> for several.')
  _FLAGS = _flags.FLAGS
  _cli.run(_main)
