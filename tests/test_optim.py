"""Optimiser parameter groups: freeze a tower, or give it a lower LR."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from reverse_sd import optim


def _config(groups=(), clip=1.0):
  config = common.get_base_config().optim  # Not locked.
  config.param_groups = groups
  config.grad_clip_norm = clip
  config.warmup_fraction = 0.0
  config.weight_decay = 0.0
  return config


def _params():
  return {'backbone': {'conv': {'kernel': jnp.ones((2, 2))}},
          'head': {'dense': {'kernel': jnp.ones((2, 2)),
                             'bias': jnp.ones((2,))}}}


def _one_step(config, grads=None):
  """The update of the second step (the first has learning rate 0)."""
  tx, schedule = optim.create_optimizer(config, total_steps=100)
  params = _params()
  if grads is None:
    grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, tx.init(params), params)
  updates, _ = tx.update(grads, opt_state, params)
  lr = float(schedule(1))
  assert lr > 0
  return jax.tree.map(np.asarray, updates), lr


def test_frozen_group_gets_no_update_and_lower_lr_group_a_smaller_one():
  updates, lr = _one_step(_config(groups=(('^backbone/', 0.0),)))
  np.testing.assert_array_equal(updates['backbone']['conv']['kernel'], 0.0)
  # Adam's first step moves each parameter by about the learning rate.
  np.testing.assert_allclose(np.abs(updates['head']['dense']['kernel']), lr,
                             rtol=1e-3)
  updates, lr = _one_step(_config(groups=(('^backbone/', 0.1),)))
  np.testing.assert_allclose(np.abs(updates['backbone']['conv']['kernel']),
                             0.1 * lr, rtol=1e-3)
  np.testing.assert_allclose(np.abs(updates['head']['dense']['bias']), lr,
                             rtol=1e-3)


def test_frozen_gradients_do_not_count_in_the_clipping_norm():
  config = _config(groups=(('^backbone/', 0.0),), clip=1e-3)
  grads = jax.tree.map(jnp.ones_like, _params())
  grads['backbone']['conv']['kernel'] = jnp.full((2, 2), 1e6)
  # Had the frozen gradient counted, the head's clipped gradients would be
  # ~1e-9 and Adam's epsilon (1e-8) would shrink its step far below the LR.
  updates, lr = _one_step(config, grads)
  np.testing.assert_allclose(np.abs(updates['head']['dense']['kernel']), lr,
                             rtol=1e-2)
  np.testing.assert_array_equal(updates['backbone']['conv']['kernel'], 0.0)


def test_labels_first_match_wins():
  labels = optim.group_labels(_params(), (('conv', 0.5), ('^backbone/', 0.0)))
  assert labels['backbone']['conv']['kernel'] == 'lr_x0.5'
  assert labels['head']['dense']['bias'] == 'default'


@pytest.mark.parametrize('groups,match', [
    ((('([', 0.1),), 'bad regex'),
    ((('^backbone/', -1.0),), '>= 0'),
    ((('^backbone/',),), 'pair'),
])
def test_bad_groups_are_named(groups, match):
  with pytest.raises(ValueError, match=match):
    optim.create_optimizer(_config(groups=groups), total_steps=10)


def test_no_groups_is_plain_adamw():
  tx, _ = optim.create_optimizer(_config(), total_steps=10)
  assert isinstance(tx, optax.GradientTransformation)
