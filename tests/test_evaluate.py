"""Scores: cosine, ridge oracle, baseline and the gap closed; the losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from reverse_sd import evaluate
from reverse_sd import losses
from reverse_sd import sharding
from reverse_sd.models import reverse_model


def test_mean_cosine_by_hand():
  pred = np.array([[1.0, 0.0], [1.0, 1.0]])
  target = np.array([[2.0, 0.0], [1.0, 0.0]])
  assert np.isclose(evaluate.mean_cosine(pred, target),
                    (1.0 + 1 / np.sqrt(2)) / 2)


def test_ridge_recovers_a_linear_map_and_leaves_the_bias_unpenalised():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2, (200, 5)).astype(np.float64)
  w = rng.normal(size=(5, 3))
  y = x @ w + 7.0
  weights = evaluate.fit_ridge(x, y, alpha=1e-8)
  np.testing.assert_allclose(weights[:-1], w, atol=1e-5)
  np.testing.assert_allclose(weights[-1], 7.0, atol=1e-5)
  # A huge alpha shrinks the slopes to 0; the bias becomes the mean.
  weights = evaluate.fit_ridge(x, y, alpha=1e9)
  np.testing.assert_allclose(weights[-1], y.mean(0), atol=1e-3)


def test_gap_closed():
  scores = {'cosine': 0.8, 'baseline_cosine': 0.7, 'oracle_cosine': 0.9}
  assert np.isclose(evaluate.gap_closed(scores), 0.5)
  assert evaluate.gap_closed({'cosine': 0.8, 'baseline_cosine': 0.7}) is None


def test_losses_by_hand():
  config = synthetic.get_config().loss
  pred = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  target = jnp.array([[1.0, 0.0], [1.0, 0.0]])
  terms = losses.embedding_losses(pred, target, config)
  np.testing.assert_allclose(terms['cosine'], [1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(terms['cosine_loss'], [0.0, 1.0], atol=1e-6)
  # Huber with delta 1 on differences (0,0) and (-1,1): 0.5 * 1 per dim.
  np.testing.assert_allclose(terms['huber_loss'], [0.0, 0.5], atol=1e-6)
  np.testing.assert_allclose(terms['loss'], [0.0, 1.5], atol=1e-6)


@pytest.mark.parametrize('micro_batch,chunk', [(0, 4), (2, 2), (3, 2), (1, 1),
                                               (64, 4)])
def test_predict_in_micro_batches_equals_the_whole_batch(micro_batch, chunk):
  """8 devices x 4 examples: chunked predictions equal unchunked ones, in
  order, and stay sharded by batch."""
  config = synthetic.get_config()
  with config.unlocked():
    config.model.variant = 'tiny'
  model = reverse_model.create_model(config.model, vocab_size=5)
  mesh = sharding.make_mesh(('data',), (-1,))
  images = jax.random.randint(jax.random.key(0), (32, 32, 32, 3), 0, 256,
                              jnp.int32).astype(jnp.uint8)
  params = model.init(jax.random.key(1), images[:1])['params']
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  inputs = sharding.host_to_global({'image': np.asarray(images)}, mesh)
  assert evaluate.chunk_size(4, micro_batch) == chunk
  want = evaluate.make_predict_step(model, mesh, replicated, micro_batch=0)(
      params, inputs)
  got = evaluate.make_predict_step(model, mesh, replicated,
                                   micro_batch=micro_batch)(params, inputs)
  assert set(got) == {'embedding', 'word_logits'}
  for key in got:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert got[key].sharding.spec[0] == 'data'


def test_micro_batch_auto_and_bad_values():
  assert evaluate.resolve_micro_batch(-1) == evaluate.CPU_MICRO_BATCH
  assert evaluate.resolve_micro_batch(0) == 0
  with pytest.raises(ValueError, match='eval.micro_batch=-2'):
    evaluate.resolve_micro_batch(-2)
