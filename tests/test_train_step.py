"""The sharded train step: 8 fake devices give the same result as 1."""

import jax
from jax.sharding import PartitionSpec as P
import numpy as np

from configs import synthetic
from reverse_sd import optim
from reverse_sd import sharding
from reverse_sd import state as state_lib
from reverse_sd import train
from reverse_sd.models import reverse_model


def _run_steps(devices, batches, config):
  mesh = sharding.make_mesh(('data',), (-1,), devices=devices)
  model = reverse_model.create_model(config.model)
  tx, schedule = optim.create_optimizer(config.optim, total_steps=10)
  state, shardings = state_lib.create_train_state(
      model, tx, batches[0]['image'].shape[1:], jax.random.key(0), mesh)
  step = train.make_train_step(model, config.loss, schedule, mesh, shardings)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.host_to_global(batch, mesh))
    losses.append(float(metrics.compute()['loss']))
  return jax.device_get(state.params), losses, state


def test_eight_devices_match_one():
  assert jax.device_count() == 8, 'conftest.py should give 8 fake devices'
  config = synthetic.get_config('tiny')
  rng = np.random.default_rng(0)
  batches = [{
      'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
      'embedding': rng.normal(size=(16, 384)).astype(np.float32),
  } for _ in range(3)]
  params_1, losses_1, _ = _run_steps(jax.devices()[:1], batches, config)
  params_8, losses_8, state_8 = _run_steps(jax.devices(), batches, config)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  flat_8 = dict(jax.tree_util.tree_leaves_with_path(params_8))
  for path, a in jax.tree_util.tree_leaves_with_path(params_1):
    name = sharding.path_str(path)
    if name.endswith('k_proj/bias'):
      # Softmax ignores a shift shared by all keys: this gradient is zero up
      # to rounding, and Adam's normalisation turns rounding into full steps.
      continue
    np.testing.assert_allclose(a, flat_8[path], rtol=1e-4, atol=1e-5,
                               err_msg=name)
  assert int(state_8.step) == 3
  # Parameters actually moved.
  assert losses_1[0] != losses_1[-1]


def test_batch_must_divide_devices():
  mesh = sharding.make_mesh(('data',), (-1,))
  try:
    sharding.check_batch_divisible(12, mesh)
  except ValueError as e:
    assert 'divisible by the 8 devices' in str(e)
  else:
    raise AssertionError('expected a ValueError')


def test_mesh_shape_errors_are_clear():
  for axes, shape, message in [(('data',), (3,), 'needs 3 devices'),
                               (('model',), (-1,), "must contain 'data'"),
                               (('data', 'model'), (-1, 3), 'does not divide')]:
    try:
      sharding.make_mesh(axes, shape)
    except ValueError as e:
      assert message in str(e), str(e)
    else:
      raise AssertionError(f'{axes} {shape}: expected a ValueError')


def test_partition_rules_place_parameters():
  mesh = sharding.make_mesh(('data', 'model'), (4, 2))
  tree = {'backbone': {'fc1': {'kernel': jax.ShapeDtypeStruct((4, 8),
                                                              np.float32)}},
          'head': {'bias': jax.ShapeDtypeStruct((8,), np.float32)}}
  shardings = sharding.tree_shardings(mesh, tree,
                                      [(r'fc1/kernel$', (None, 'model'))])
  assert shardings['backbone']['fc1']['kernel'].spec == P(None, 'model')
  assert shardings['head']['bias'].spec == P()


def _vocab_head_change(vocab_loss_weight):
  """Largest change of the vocabulary head's kernel after two steps."""
  config = synthetic.get_config('tiny')
  with config.unlocked():
    config.optim.weight_decay = 0.0  # Only gradients may move parameters.
  mesh = sharding.make_mesh(('data',), (-1,))
  model = reverse_model.create_model(config.model, vocab_size=12)
  tx, schedule = optim.create_optimizer(config.optim, total_steps=10)
  state, shardings = state_lib.create_train_state(
      model, tx, (32, 32, 3), jax.random.key(0), mesh)
  before = np.asarray(state.params['vocab_head']['kernel'])
  step = train.make_train_step(model, config.loss, schedule, mesh, shardings,
                               vocab_loss_weight=vocab_loss_weight)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           'embedding': rng.normal(size=(16, 384)).astype(np.float32),
           'labels': rng.integers(0, 2, (16, 12)).astype(np.uint8)}
  state, metrics = step(state, sharding.host_to_global(batch, mesh))
  # warm-up makes step 0's learning rate 0; take a second step.
  state, metrics = step(state, sharding.host_to_global(batch, mesh))
  after = np.asarray(state.params['vocab_head']['kernel'])
  return float(np.abs(after - before).max()), metrics.compute()


def test_vocabulary_bce_gradient_reaches_the_head():
  change, metrics = _vocab_head_change(0.1)
  assert change > 0.0
  # BCE of random logits against random labels is near log(2).
  assert 0.3 < float(metrics['vocab_bce']) < 1.5
  unchanged, _ = _vocab_head_change(0.0)
  assert unchanged == 0.0
