r"""Domain-adaptive kernel learning (DA-KL): transductive kernel ridge.

Croitoru et al., "Reverse Stable Diffusion" (CVIU 2024) adapt a trained
model's predicted prompt embeddings to an unlabelled test set:

* Features: the 384-d predicted embeddings of one run, or of a weighted
  ensemble (`reverse_sd.ensemble`).
* Source points: `kmeans` centroids of the TRAINING predictions (the paper
  used k = 10,000). `label_centroids` labels each centroid with the true
  embedding of the training example whose prediction is nearest to it by
  cosine (ties: the lower index). With k >= the number of training examples,
  the training predictions themselves are the source points.
* Target points: the predictions on the (unlabelled) test split.
* Kernel: K(a, b) = exp(-gamma * (1 - cos(a, b)) / 2), in [exp(-gamma), 1].
  (The exponential is applied once; the authors' code re-applies it in its
  loop.)
* Each sample x is represented by its kernel values against all points,
  phi(x) = [K(x, s_1..s_S), K(x, t_1..t_T)] (length P = S + T; with
  `use_target=False`, "DA-KL with source only", against the S source points,
  P = S). Ridge regression (no intercept, like kernel ridge) on phi is fitted
  on the source points with their labels and applied to the target points;
  the outputs are L2-normalised.

Linear algebra. With Phi_s [S, P] and Phi_t [T, P] the representations of
source and target points, ridge in the dual is

  A = (G + alpha I)^-1 Y_s,  G = Phi_s Phi_s^T  [S, S],
  prediction_t = Phi_t Phi_s^T A = Phi_t W,  W = Phi_s^T A  [P, D].

The dual is cheaper than the primal ((P x P) with P = S + T = 30,000 at
10k x 20k vs S x S = 10,000). Neither Phi nor the [T, S] matrix Phi_t Phi_s^T
is ever formed: the P representation columns (one per point) are visited in
chunks of `chunk_size` points; for a chunk c the jitted JAX kernel gives the
blocks K(sources, c) [S, c] and K(targets, c) [T, c] (float32), and

  pass 1:  G   += K(sources, c) K(sources, c)^T        (BLAS dsyrk, float64)
  solve:   A    = cho_solve(G + alpha I, Y_s)           (LAPACK, float64)
  pass 2:  W_c  = K(sources, c)^T A;  out += K(targets, c) W_c   (float64)

The products and the solve are float64: G's rows are all-positive, so its
top eigenvalue is near its trace, and float32 accumulation would perturb it
by ~1e-7 * trace, comparable to small alphas; float64 products of the
float32 kernel blocks make G the exact Gram matrix of (rounded) features,
so it stays positive semi-definite. Several alphas share pass 1 and pass 2
(their A are stacked column-wise), which is how validation selection is fast.

Cost at S = 10,000, T = 20,000, D = 384, chunk_size = 1024: pass 1 is
S^2 P / 2 = 1.5e12 multiply-adds (dominant); the kernel blocks 2 (S+T) P D =
7e11; pass 2 P S D + T P D = 3.5e11 per alpha; Cholesky S^3 / 3 = 3e11 per
alpha. Memory: G 800 MB (float64) plus its factor 800 MB, one chunk's blocks
(S + T) x 1024 in float32 and float64 (~370 MB), outputs T x D float64
(60 MB): under 2.2 GB peak, independent of the full 30k x 30k kernel (3.6 GB
in float32) that is never built. See benchmarks/dakl_scaling.py.

k-means: spherical k-means on unit vectors (the kernel only sees cosines):
assignment by the highest cosine, centroids = renormalised means, an empty
cluster keeps its centroid. k-means++ (default; D^2 seeding with the
distance 1 - cos, sampled by inverse CDF) or random distinct points, from
`seed`; a fixed number of Lloyd iterations; assignments computed in chunks
of rows against all centroids. Deterministic given the seed; the objective
sum(1 - cos) never increases.

The command (predictions are computed and cached when missing, see
`reverse_sd.prediction_cache`):

  python -m reverse_sd.dakl --workdirs=RUN[,RUN...] \
      [--weights=W,... | --fit_weights] --split=test_shifted \
      [--num_centroids=10000] [--gamma=10] [--alpha=1] [--source_only] \
      [--select_on_validation --gammas=1,3,10,30,100 \
       --alphas=0.01,0.1,1,10,100] [--output_dir=DIR]

writes into --output_dir (default WORKDIR/dakl for one run,
<parent>/ensemble-<names>/dakl for several) `dakl_<split>.npz` ('ids',
'adapted_embedding', 'input_embedding', 'true_embedding') and
`dakl_<split>.json` (settings, timings; cosine and recall@1/5/10 of the
adapted and of the unadapted input). With --source_only the files are
`dakl_<split>_source_only.*`. With --select_on_validation, gamma and alpha
maximise the validation mean cosine, with the validation predictions as the
target points (the same transductive set-up as on the test split).

Defaults: gamma = 10 (K falls to exp(-5) at cos = 0 and to 0.61 at cos =
0.9); alpha = 1 (G's diagonal is sum_p K^2, of order 10-1000 at these
sizes); k = 10,000; 20 Lloyd iterations; k-means++ from seed 0.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import functools
import json
import logging
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from scipy.linalg import blas

from reverse_sd import ensemble
from reverse_sd import prediction_cache
from reverse_sd.ops.cpu import tuning

DEFAULT_GAMMA = 10.0
DEFAULT_ALPHA = 1.0
DEFAULT_NUM_CENTROIDS = 10_000
DEFAULT_KMEANS_ITERATIONS = 20
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_GAMMAS = (1.0, 3.0, 10.0, 30.0, 100.0)
DEFAULT_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)
KMEANS_INITS = ('kmeans++', 'random')
_EPS = 1e-12


# ----------------------------------------------------------------------------
# The kernel.


def unit_rows(x_NxD: np.ndarray, what: str) -> np.ndarray:
  """float32 rows scaled to unit norm; raises ValueError naming `what` for an
  empty, non-finite or all-zero input row."""
  prediction_cache.check_embeddings(x_NxD, what)
  x_NxD = np.asarray(x_NxD, np.float32)
  norms = np.linalg.norm(x_NxD, axis=1, keepdims=True)
  if np.any(norms == 0):
    raise ValueError(f'{what}: row {int(np.argmin(norms))} is all zeros; '
                     'cosines need non-zero vectors.')
  return x_NxD / norms


@jax.jit
def _unit_kernel(a_unit_NxD, b_unit_MxD, gamma):
  """K for rows already of unit norm."""
  cos = jnp.clip(a_unit_NxD @ b_unit_MxD.T, -1.0, 1.0)
  return jnp.exp(-gamma * (1.0 - cos) / 2.0)


def cosine_kernel(a_NxD: jax.Array, b_MxD: jax.Array,
                  gamma: float) -> jax.Array:
  """K(a, b) = exp(-gamma * (1 - cos(a, b)) / 2): [N, M] float32."""
  def unit(x):
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), _EPS)
  return _unit_kernel(unit(a_NxD), unit(b_MxD), jnp.float32(gamma))


def _pad_rows(x_NxD: np.ndarray, multiple: int) -> np.ndarray:
  pad = -len(x_NxD) % multiple
  return np.pad(x_NxD, ((0, pad), (0, 0))) if pad else x_NxD


@functools.partial(jax.jit, static_argnames=('chunk_size',))
def _kernel_rows_chunked(a_unit, b_unit, gamma, chunk_size):
  chunks = a_unit.reshape(-1, chunk_size, a_unit.shape[1])
  blocks = jax.lax.map(lambda rows: _unit_kernel(rows, b_unit, gamma), chunks)
  return blocks.reshape(-1, b_unit.shape[0])


def kernel_matrix(a_NxD: np.ndarray, b_MxD: np.ndarray, gamma: float, *,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """The [N, M] float32 kernel, computed `chunk_size` rows of `a` at a time
  (one jitted program; the result itself is N x M)."""
  _check_positive(gamma=gamma, chunk_size=chunk_size)
  a = unit_rows(a_NxD, 'a')
  b = unit_rows(b_MxD, 'b')
  _check_same_size(a, b, 'a', 'b')
  chunk_size = min(chunk_size, len(a))
  out = _kernel_rows_chunked(jnp.asarray(_pad_rows(a, chunk_size)),
                             jnp.asarray(b), jnp.float32(gamma),
                             chunk_size=chunk_size)
  return np.asarray(out)[:len(a)]


def _column_blocks(rows_unit: np.ndarray, points_unit: np.ndarray,
                   gamma: float, chunk_size: int
                   ) -> Iterator[np.ndarray]:
  """K(rows, points[c]) [R, |c|] float32, for consecutive chunks c of
  `chunk_size` points. The last chunk is zero-padded so that every call has
  the same shapes (one compilation); its padded columns are dropped."""
  rows = jnp.asarray(rows_unit)
  gamma = jnp.float32(gamma)
  for start in range(0, len(points_unit), chunk_size):
    chunk = points_unit[start:start + chunk_size]
    valid = len(chunk)
    block = _unit_kernel(rows, jnp.asarray(_pad_rows(chunk, chunk_size)),
                         gamma)
    yield np.asarray(block)[:, :valid]


# ----------------------------------------------------------------------------
# Kernel ridge on the kernel representation.


def _check_positive(**values) -> None:
  for name, value in values.items():
    if not value > 0:
      raise ValueError(f'{name}={value!r}; expected a positive number.')


def _check_same_size(a, b, name_a: str, name_b: str) -> None:
  if a.shape[1] != b.shape[1]:
    raise ValueError(f'{name_a} has {a.shape[1]}-d embeddings but {name_b} '
                     f'{b.shape[1]}-d; they must come from the same model '
                     'space.')


def source_gram(source_unit_SxD: np.ndarray, points_unit_PxD: np.ndarray,
                gamma: float, chunk_size: int) -> np.ndarray:
  """G = Phi_s Phi_s^T [S, S] float64, Fortran order; only the UPPER
  triangle is filled (dsyrk), which is all the Cholesky solve reads."""
  num_source = len(source_unit_SxD)
  gram = np.zeros((num_source, num_source), np.float64, order='F')
  for block_Sxc in _column_blocks(source_unit_SxD, points_unit_PxD, gamma,
                                  chunk_size):
    # block.T is a Fortran-ordered view, so no copy: trans=1 gives A^T A.
    gram = blas.dsyrk(1.0, block_Sxc.astype(np.float64).T, beta=1.0, c=gram,
                      trans=1, lower=0, overwrite_c=1)
  return gram


def ridge_coefficients(gram_upper_SxS: np.ndarray, labels_SxD: np.ndarray,
                       alpha: float) -> np.ndarray:
  """A = (G + alpha I)^-1 Y by Cholesky, float64, reading G's upper
  triangle.

  Raises:
    ValueError: G + alpha I not positive definite (alpha too small for the
      rounding of G).
  """
  _check_positive(alpha=alpha)
  system = np.array(gram_upper_SxS, np.float64, order='F')
  system[np.diag_indices_from(system)] += alpha
  try:
    factor = scipy.linalg.cho_factor(system, lower=False, overwrite_a=True,
                                     check_finite=False)
  except np.linalg.LinAlgError as e:
    raise ValueError(
        f'Kernel ridge: G + alpha*I is not positive definite at alpha={alpha} '
        f'(G is {len(system)}x{len(system)}, max diagonal '
        f'{float(np.max(np.diag(gram_upper_SxS))):.3g}); use a larger alpha.'
    ) from e
  return scipy.linalg.cho_solve(factor, np.asarray(labels_SxD, np.float64),
                                check_finite=False)


def predict_targets(source_unit_SxD: np.ndarray, target_unit_TxD: np.ndarray,
                    points_unit_PxD: np.ndarray, coefficients_SxC: np.ndarray,
                    gamma: float, chunk_size: int) -> np.ndarray:
  """Phi_t Phi_s^T A [T, C] float64 (not normalised), visiting the
  representation columns (points) in chunks: W_c = K(S, c)^T A, then
  out += K(T, c) W_c."""
  num_source = len(source_unit_SxD)
  rows = np.concatenate([source_unit_SxD, target_unit_TxD])
  out = np.zeros((len(target_unit_TxD), coefficients_SxC.shape[1]),
                 np.float64)
  for block in _column_blocks(rows, points_unit_PxD, gamma, chunk_size):
    block = block.astype(np.float64)
    weights_cxC = block[:num_source].T @ coefficients_SxC
    out += block[num_source:] @ weights_cxC
  return out


def fit_predict_alphas(source_x: np.ndarray, source_y: np.ndarray,
                       target_x: np.ndarray, *, gamma: float,
                       alphas: Sequence[float], use_target: bool = True,
                       chunk_size: int = DEFAULT_CHUNK_SIZE
                       ) -> list[np.ndarray]:
  """`fit_predict` for several ridge strengths at the cost of about one.

  Returns:
    One [T, D_y] float32 array of unit rows per alpha, in order.
  """
  source = unit_rows(source_x, 'source_x')
  target = unit_rows(target_x, 'target_x')
  prediction_cache.check_embeddings(source_y, 'source_y')
  _check_same_size(source, target, 'source_x', 'target_x')
  if len(source_y) != len(source):
    raise ValueError(f'source_y has {len(source_y)} rows for {len(source)} '
                     'source points.')
  if not alphas:
    raise ValueError('No alpha given.')
  _check_positive(gamma=gamma, chunk_size=chunk_size, **{
      f'alphas[{i}]': a for i, a in enumerate(alphas)})
  points = np.concatenate([source, target]) if use_target else source
  chunk_size = min(int(chunk_size), len(points))
  gram = source_gram(source, points, gamma, chunk_size)
  coefficients = np.concatenate(
      [ridge_coefficients(gram, source_y, alpha) for alpha in alphas], axis=1)
  del gram
  out = predict_targets(source, target, points, coefficients, gamma,
                        chunk_size)
  width = np.shape(source_y)[1]
  return [ensemble.normalize(out[:, i * width:(i + 1) * width])
          for i in range(len(alphas))]


def fit_predict(source_x: np.ndarray, source_y: np.ndarray,
                target_x: np.ndarray, *, gamma: float, alpha: float,
                use_target: bool = True,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """DA-KL: kernel ridge on the kernel representation, source -> target.

  Args:
    source_x: [S, D] source points (e.g. centroids of training predictions).
    source_y: [S, D_y] their labels (true embeddings).
    target_x: [T, D] target points (test predictions), unlabelled.
    gamma: kernel width, K = exp(-gamma * (1 - cos) / 2).
    alpha: ridge strength (added to the diagonal of G = Phi_s Phi_s^T).
    use_target: represent samples against source and target points (DA-KL);
      False: against the source points only.
    chunk_size: points per kernel block; memory ~ (S + T) * chunk_size.

  Returns:
    [T, D_y] float32 adapted predictions, unit rows.

  Raises:
    ValueError: empty or non-finite inputs, mismatched sizes, gamma or
      alpha <= 0.
  """
  return fit_predict_alphas(source_x, source_y, target_x, gamma=gamma,
                            alphas=(alpha,), use_target=use_target,
                            chunk_size=chunk_size)[0]


# ----------------------------------------------------------------------------
# Spherical k-means and the source points.


@dataclasses.dataclass(frozen=True)
class KMeansResult:
  centroids: np.ndarray  # [k, D] float32, unit rows.
  assignment: np.ndarray  # [N] int32, nearest final centroid of each point.
  inertia: np.ndarray  # [iterations + 1] sum(1 - cos) before each update
                       # and at the end; non-increasing.


def _nearest(queries_unit, keys_unit, chunk_size):
  """(argmax, max) of cosine over keys for each query, chunked over queries
  (blocks of chunk_size x len(keys)). Ties: the lower key index."""
  num = queries_unit.shape[0]
  pad = -num % chunk_size
  padded = jnp.pad(queries_unit, ((0, pad), (0, 0)))
  chunks = padded.reshape(-1, chunk_size, queries_unit.shape[1])

  def one(rows):
    sims = rows @ keys_unit.T
    return jnp.argmax(sims, axis=1).astype(jnp.int32), jnp.max(sims, axis=1)

  index, best = jax.lax.map(one, chunks)
  return index.reshape(-1)[:num], best.reshape(-1)[:num]


_nearest_jit = jax.jit(_nearest, static_argnames='chunk_size')


def _kmeans_plus_plus(points, key, num_clusters):
  num_points = points.shape[0]
  key, first_key = jax.random.split(key)
  first = jax.random.randint(first_key, (), 0, num_points)
  centroids = jnp.zeros((num_clusters, points.shape[1]), points.dtype)
  centroids = centroids.at[0].set(points[first])
  min_dist = jnp.maximum(1.0 - points @ points[first], 0.0)

  def body(i, carry):
    centroids, min_dist, key = carry
    key, draw_key = jax.random.split(key)
    # D^2 seeding: ||a - b||^2 = 2 (1 - cos) on unit vectors. Inverse CDF,
    # one uniform number per centroid; uniform when every distance is 0.
    weights = jnp.where(jnp.sum(min_dist) > 0, min_dist, 1.0)
    cdf = jnp.cumsum(weights)
    u = jax.random.uniform(draw_key, (), cdf.dtype) * cdf[-1]
    index = jnp.minimum(jnp.searchsorted(cdf, u, side='right'),
                        num_points - 1)
    centroid = points[index]
    return (centroids.at[i].set(centroid),
            jnp.minimum(min_dist, jnp.maximum(1.0 - points @ centroid, 0.0)),
            key)

  centroids, _, _ = jax.lax.fori_loop(1, num_clusters, body,
                                      (centroids, min_dist, key))
  return centroids


@functools.partial(jax.jit, static_argnames=('num_clusters', 'num_iterations',
                                             'init', 'chunk_size'))
def _kmeans(points, key, num_clusters, num_iterations, init, chunk_size):
  if init == 'kmeans++':
    centroids = _kmeans_plus_plus(points, key, num_clusters)
  else:
    chosen = jax.random.choice(key, points.shape[0], (num_clusters,),
                               replace=False)
    centroids = points[chosen]

  def lloyd(centroids, _):
    assignment, best = _nearest(points, centroids, chunk_size)
    sums = jax.ops.segment_sum(points, assignment, num_segments=num_clusters)
    norms = jnp.linalg.norm(sums, axis=1, keepdims=True)
    # An empty cluster (or one whose points cancel) keeps its centroid.
    new = jnp.where(norms > 0, sums / jnp.maximum(norms, _EPS), centroids)
    return new, jnp.sum(1.0 - best)

  centroids, inertia = jax.lax.scan(lloyd, centroids, None,
                                    length=num_iterations)
  assignment, best = _nearest(points, centroids, chunk_size)
  return centroids, assignment, jnp.append(inertia, jnp.sum(1.0 - best))


def kmeans(points_NxD: np.ndarray, num_clusters: int, *, seed: int = 0,
           num_iterations: int = DEFAULT_KMEANS_ITERATIONS,
           init: str = 'kmeans++',
           chunk_size: int = DEFAULT_CHUNK_SIZE) -> KMeansResult:
  """Spherical k-means of the rows of `points_NxD` (normalised first).

  Args:
    points_NxD: the points, e.g. training predictions.
    num_clusters: k, 1 <= k <= N.
    seed: the seed of the initialisation; the result is a function of it.
    num_iterations: Lloyd iterations (a fixed number, no early stop).
    init: 'kmeans++' or 'random' (k distinct points).
    chunk_size: points per assignment block (chunk_size x k similarities).

  Raises:
    ValueError: k out of range, unknown init, bad points.
  """
  points = unit_rows(points_NxD, 'k-means points')
  if not 1 <= num_clusters <= len(points):
    raise ValueError(f'num_clusters={num_clusters}; expected 1 to the number '
                     f'of points, {len(points)}.')
  if init not in KMEANS_INITS:
    raise ValueError(f'init={init!r}; expected one of {KMEANS_INITS}.')
  if num_iterations < 0:
    raise ValueError(f'num_iterations={num_iterations}; expected >= 0.')
  _check_positive(chunk_size=chunk_size)
  centroids, assignment, inertia = _kmeans(
      jnp.asarray(points), jax.random.key(seed), num_clusters=num_clusters,
      num_iterations=num_iterations, init=init,
      chunk_size=min(chunk_size, len(points)))
  return KMeansResult(np.asarray(centroids), np.asarray(assignment),
                      np.asarray(inertia, np.float64))


def label_centroids(centroids_KxD: np.ndarray, train_predicted_NxD: np.ndarray,
                    train_targets_NxE: np.ndarray, *,
                    chunk_size: int = DEFAULT_CHUNK_SIZE
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Labels each centroid with the true embedding of the training example
  whose PREDICTION is nearest to it by cosine (ties: the lower index).

  The nearest prediction is usually, not necessarily, in the centroid's own
  cluster; either way the label is a real prompt embedding, not an average.

  Returns:
    labels [k, E] float32 and the chosen training rows [k] int.
  """
  centroids = unit_rows(centroids_KxD, 'centroids')
  train = unit_rows(train_predicted_NxD, 'training predictions')
  _check_same_size(centroids, train, 'centroids', 'training predictions')
  if len(train_targets_NxE) != len(train):
    raise ValueError(f'{len(train_targets_NxE)} training targets for '
                     f'{len(train)} training predictions.')
  _check_positive(chunk_size=chunk_size)
  index, _ = _nearest_jit(
      jnp.asarray(centroids), jnp.asarray(train),
      chunk_size=min(chunk_size, len(centroids)))
  index = np.asarray(index)
  return np.asarray(train_targets_NxE, np.float32)[index], index


def make_source_points(train_x: np.ndarray, train_y: np.ndarray,
                       num_centroids: int, *, seed: int = 0,
                       num_iterations: int = DEFAULT_KMEANS_ITERATIONS,
                       init: str = 'kmeans++',
                       chunk_size: int = DEFAULT_CHUNK_SIZE
                       ) -> tuple[np.ndarray, np.ndarray, dict]:
  """(source_x, source_y, info): labelled k-means centroids of the training
  predictions, or the training predictions themselves when
  num_centroids >= their number."""
  if num_centroids < 1:
    raise ValueError(f'num_centroids={num_centroids}; expected >= 1.')
  if num_centroids >= len(train_x):
    logging.info('num_centroids=%d >= %d training examples: the training '
                 'predictions are the source points.', num_centroids,
                 len(train_x))
    return (unit_rows(train_x, 'training predictions'),
            np.asarray(train_y, np.float32),
            {'source': 'training predictions', 'num_source': len(train_x)})
  result = kmeans(train_x, num_centroids, seed=seed,
                  num_iterations=num_iterations, init=init,
                  chunk_size=chunk_size)
  labels, rows = label_centroids(result.centroids, train_x, train_y,
                                 chunk_size=chunk_size)
  info = {'source': 'k-means centroids', 'num_source': num_centroids,
          'seed': seed, 'init': init, 'iterations': num_iterations,
          'inertia_first': float(result.inertia[0]),
          'inertia_last': float(result.inertia[-1]),
          'distinct_labels': int(len(np.unique(rows)))}
  return result.centroids, labels, info


def select_on_validation(source_x, source_y, validation_x, validation_y, *,
                         gammas: Sequence[float], alphas: Sequence[float],
                         use_target: bool = True,
                         chunk_size: int = DEFAULT_CHUNK_SIZE
                         ) -> tuple[float, float, list[dict]]:
  """(gamma, alpha, grid) maximising the mean cosine on validation, with the
  validation predictions as the target points. Ties: the first in the grid."""
  # Imported here: it pulls in the data pipeline, which the kernel code
  # does not need.
  from reverse_sd import evaluate  # pylint: disable=g-import-not-at-top
  grid = []
  for gamma in gammas:
    adapted = fit_predict_alphas(source_x, source_y, validation_x,
                                 gamma=gamma, alphas=alphas,
                                 use_target=use_target, chunk_size=chunk_size)
    for alpha, preds in zip(alphas, adapted):
      grid.append({'gamma': float(gamma), 'alpha': float(alpha),
                   'validation_cosine': evaluate.mean_cosine(preds,
                                                             validation_y)})
      logging.info('DA-KL validation: gamma=%g alpha=%g cosine %.4f', gamma,
                   alpha, grid[-1]['validation_cosine'])
  best = max(grid, key=lambda row: row['validation_cosine'])
  return best['gamma'], best['alpha'], grid


# ----------------------------------------------------------------------------
# The command.


def run_dakl(workdirs: Sequence[str], *, split: str,
             weights: Sequence[float] | None = None, fit_weights: bool = False,
             num_centroids: int = DEFAULT_NUM_CENTROIDS,
             gamma: float = DEFAULT_GAMMA, alpha: float = DEFAULT_ALPHA,
             use_target: bool = True, select: bool = False,
             gammas: Sequence[float] = DEFAULT_GAMMAS,
             alphas: Sequence[float] = DEFAULT_ALPHAS, seed: int = 0,
             kmeans_iterations: int = DEFAULT_KMEANS_ITERATIONS,
             kmeans_init: str = 'kmeans++',
             chunk_size: int = DEFAULT_CHUNK_SIZE,
             output_dir: str | os.PathLike[str] = '',
             compute_missing: bool = True) -> dict:
  """Adapts the runs' (ensemble's) predictions of `split`; writes the .npz
  and .json described in the module docstring and returns the JSON record."""
  if split == 'train':
    raise ValueError('--split=train: the training split provides the source '
                     'points; adapt a held-out split.')
  timings = {}
  start = time.time()
  needed = ['train', split]
  if fit_weights or select:
    needed.insert(1, 'validation')
  runs = prediction_cache.load_aligned(workdirs, list(dict.fromkeys(needed)),
                                      compute_missing=compute_missing)
  timings['predictions'] = time.time() - start
  chosen, how = ensemble.choose_weights(
      len(workdirs), weights=weights, fit=fit_weights,
      validation=runs.get('validation', ()))
  features = {name: ensemble.combine([p.predicted for p in members], chosen)
              for name, members in runs.items()}
  targets = {name: members[0].targets for name, members in runs.items()}

  start = time.time()
  source_x, source_y, source_info = make_source_points(
      features['train'], targets['train'], num_centroids, seed=seed,
      num_iterations=kmeans_iterations, init=kmeans_init,
      chunk_size=chunk_size)
  timings['source_points'] = time.time() - start
  grid = None
  if select:
    start = time.time()
    gamma, alpha, grid = select_on_validation(
        source_x, source_y, features['validation'], targets['validation'],
        gammas=gammas, alphas=alphas, use_target=use_target,
        chunk_size=chunk_size)
    timings['selection'] = time.time() - start
  start = time.time()
  adapted = fit_predict(source_x, source_y, features[split], gamma=gamma,
                        alpha=alpha, use_target=use_target,
                        chunk_size=chunk_size)
  timings['fit_predict'] = time.time() - start

  output_dir = pathlib.Path(output_dir or
                            ensemble.default_output_dir(workdirs, 'dakl'))
  stem = f'dakl_{split}' + ('' if use_target else '_source_only')
  members = runs[split]
  record = {
      'split': split, 'workdirs': [str(w) for w in workdirs],
      'steps': [p.step for p in members], 'weights': chosen.tolist(),
      'weights_chosen': how, 'gamma': float(gamma), 'alpha': float(alpha),
      'use_target': use_target, 'num_target': len(members[0]),
      'requested_num_centroids': num_centroids, **source_info,
      'metrics': {
          'adapted': prediction_cache.embedding_metrics(adapted,
                                                       targets[split]),
          'unadapted': prediction_cache.embedding_metrics(features[split],
                                                         targets[split])},
      'selection': grid, 'seconds': timings}
  prediction_cache.atomic_write(
      output_dir / f'{stem}.npz', lambda f: np.savez(
          f, ids=members[0].ids, adapted_embedding=adapted,
          input_embedding=features[split], true_embedding=targets[split]))
  prediction_cache.write_json(output_dir / f'{stem}.json', record)
  record['output'] = str(output_dir / f'{stem}.json')
  logging.info('DA-KL on %s: cosine %.4f -> %.4f; wrote %s.', split,
               record['metrics']['unadapted']['cosine'],
               record['metrics']['adapted']['cosine'], record['output'])
  return record


def _main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f'dakl: unexpected arguments {argv[1:]}')
  tuning.tune_process()
  parse_list = prediction_cache.parse_list
  parse_floats = prediction_cache.parse_floats
  try:
    record = run_dakl(
        parse_list(_FLAGS.workdirs, 'workdirs'), split=_FLAGS.split,
        weights=(parse_floats(_FLAGS.weights, 'weights') if _FLAGS.weights
                 else None),
        fit_weights=_FLAGS.fit_weights, num_centroids=_FLAGS.num_centroids,
        gamma=_FLAGS.gamma, alpha=_FLAGS.alpha,
        use_target=not _FLAGS.source_only,
        select=_FLAGS.select_on_validation,
        gammas=parse_floats(_FLAGS.gammas, 'gammas'),
        alphas=parse_floats(_FLAGS.alphas, 'alphas'), seed=_FLAGS.seed,
        kmeans_iterations=_FLAGS.kmeans_iterations,
        kmeans_init=_FLAGS.kmeans_init, chunk_size=_FLAGS.chunk_size,
        output_dir=_FLAGS.output_dir)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'dakl: error: {e}') from e
  print(json.dumps({k: record[k] for k in ('output', 'gamma', 'alpha',
                                           'num_source', 'metrics')},
                   indent=2, default=float))
  sys.stdout.flush()


if __name__ == '__main__':
  from reverse_sd import cli as _cli  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  _flags.DEFINE_string('workdirs', None, 'Comma-separated trained runs.',
                       required=True)
  _flags.DEFINE_string('weights', '', 'Ensemble weights, one per run '
                       '(rescaled to sum to 1). Default: uniform.')
  _flags.DEFINE_bool('fit_weights', False,
                     'Fit the ensemble weights on the validation split.')
  _flags.DEFINE_string('split', 'test_shifted', 'The split to adapt to.')
  _flags.DEFINE_integer('num_centroids', DEFAULT_NUM_CENTROIDS,
                        'k: source points (k-means centroids of training '
                        'predictions).', lower_bound=1)
  _flags.DEFINE_float('gamma', DEFAULT_GAMMA, 'Kernel width.')
  _flags.DEFINE_float('alpha', DEFAULT_ALPHA, 'Ridge strength.')
  _flags.DEFINE_bool('source_only', False,
                     'Represent samples against the source points only.')
  _flags.DEFINE_bool('select_on_validation', False,
                     'Choose gamma and alpha from --gammas x --alphas by '
                     'validation cosine (overrides --gamma, --alpha).')
  _flags.DEFINE_string('gammas', ','.join(map(str, DEFAULT_GAMMAS)),
                       'Gamma grid for --select_on_validation.')
  _flags.DEFINE_string('alphas', ','.join(map(str, DEFAULT_ALPHAS)),
                       'Alpha grid for --select_on_validation.')
  _flags.DEFINE_integer('seed', 0, 'k-means seed.')
  _flags.DEFINE_integer('kmeans_iterations', DEFAULT_KMEANS_ITERATIONS,
                        'Lloyd iterations.', lower_bound=0)
  _flags.DEFINE_enum('kmeans_init', 'kmeans++', list(KMEANS_INITS),
                     'k-means initialisation.')
  _flags.DEFINE_integer('chunk_size', DEFAULT_CHUNK_SIZE,
                        'Points per kernel block.', lower_bound=1)
  _flags.DEFINE_string('output_dir', '', 'Default: WORKDIR/dakl for one run, '
                       '<parent>/ensemble-<names>/dakl for several.')
  _FLAGS = _flags.FLAGS
  _cli.run(_main)
