"""The loop's resumable trainer: resume equals an uninterrupted run, a
finished run loads without training, a foreign checkpoint names its keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reverse_sd.loop import trainer

SCHEDULE = trainer.Schedule(steps=6, lr=0.1, ema_decay=0.5,
                            checkpoint_every=2, log_every=2)


def _problem(width=3):
  params = {'dense': {'kernel': jnp.zeros((width, 1)), 'bias': jnp.zeros(1)}}
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, width)).astype(np.float32)
  y = x @ np.arange(1, width + 1, dtype=np.float32)[:, None]

  def loss_fn(p, batch, rng):
    noise = 0.01 * jax.random.normal(rng, batch['y'].shape)
    pred = batch['x'] @ p['dense']['kernel'] + p['dense']['bias']
    loss = jnp.mean((pred - batch['y'] - noise)**2)
    return loss, {'mse': loss}

  make_batch = lambda step: {'x': x[8 * (step % 8):8 * (step % 8) + 8],
                             'y': y[8 * (step % 8):8 * (step % 8) + 8]}
  return params, loss_fn, make_batch


class _Killed(Exception):
  pass


def test_resume_after_kill_equals_uninterrupted(tmp_path):
  params, loss_fn, make_batch = _problem()
  full = trainer.train(tmp_path / 'full', name='t', init_params=params,
                       loss_fn=loss_fn, make_batch=make_batch,
                       schedule=SCHEDULE)

  def dying(step):
    if step == 4:  # After the checkpoint of step 4 was saved.
      raise _Killed()
    return make_batch(step)

  with pytest.raises(_Killed):
    trainer.train(tmp_path / 'resumed', name='t', init_params=params,
                  loss_fn=loss_fn, make_batch=dying, schedule=SCHEDULE)
  assert not (tmp_path / 'resumed' / 'train_done.json').exists()
  seen = []
  resumed = trainer.train(
      tmp_path / 'resumed', name='t', init_params=params, loss_fn=loss_fn,
      make_batch=lambda s: seen.append(s) or make_batch(s),
      schedule=SCHEDULE)
  assert seen == [4, 5]
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # The EMA lags the parameters.
  assert not np.allclose(full[0]['dense']['kernel'],
                         full[1]['dense']['kernel'])


def test_finished_run_loads_without_training(tmp_path):
  params, loss_fn, make_batch = _problem()
  first = trainer.train(tmp_path, name='t', init_params=params,
                        loss_fn=loss_fn, make_batch=make_batch,
                        schedule=SCHEDULE)
  again = trainer.train(tmp_path, name='t', init_params=params,
                        loss_fn=loss_fn, make_batch=None, schedule=SCHEDULE)
  loaded = trainer.load(tmp_path, params)
  for a, b, c in zip(jax.tree.leaves(first), jax.tree.leaves(again),
                     jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_checkpoint_of_another_config_names_the_keys(tmp_path):
  params, loss_fn, make_batch = _problem(width=3)
  trainer.train(tmp_path, name='t', init_params=params, loss_fn=loss_fn,
                make_batch=make_batch, schedule=SCHEDULE)
  other = {'dense': {'kernel': jnp.zeros((5, 1)), 'bias': jnp.zeros(1)},
           'extra': {'scale': jnp.ones(2)}}
  with pytest.raises(ValueError, match=r"dense/kernel.*\(3, 1\).*\(5, 1\)"
                     r"|extra/scale") as error:
    trainer.load(tmp_path, other)
  assert 'extra/scale' in str(error.value)
  assert 'dense/kernel' in str(error.value)
  with pytest.raises(ValueError, match='dense/kernel'):
    trainer.train(tmp_path, name='t', init_params=other, loss_fn=loss_fn,
                  make_batch=make_batch, schedule=SCHEDULE)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    trainer.load(tmp_path, {'w': jnp.zeros(1)})
