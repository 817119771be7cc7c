"""The gradients' global norm: the fused CPU kernel against optax's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from reverse_sd import optim


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  # Sizes that are not multiples of the kernel's 8- and 32-float steps, one
  # over its 16K chunk, a scalar and an empty array.
  shapes = {'a': (3, 5), 'b': (7,), 'c': (129, 257), 'd': (), 'e': (0, 4),
            'f': (4, 8)}
  return {k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 3)
          for k, s in shapes.items()}


def _reference(tree):
  return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                     for x in jax.tree.leaves(tree)))


def test_kernel_norm_matches_float64():
  tree = _tree()
  got = jax.jit(lambda t: optim.global_norm(t, 'cpu_kernel'))(tree)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), _reference(tree), rtol=1e-6)
  np.testing.assert_allclose(float(optim.global_norm(tree, 'xla')),
                             _reference(tree), rtol=1e-5)


def test_kernel_norm_is_exact_on_a_large_sum():
  # 10M ones: float32 running sums stop at 2**24; the chunked sum does not.
  ones = jnp.ones((10_000_000,), jnp.float32)
  got = float(jax.jit(lambda x: optim.global_norm([x], 'cpu_kernel'))(ones))
  assert got == pytest.approx(np.sqrt(1e7), rel=1e-7)


def test_kernel_norm_of_a_sharded_tree():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  tree = _tree(1)
  sharded = jax.device_put(
      tree['c'][:128], jax.NamedSharding(mesh, jax.P('data')))
  got = jax.jit(lambda t: optim.global_norm(t, 'cpu_kernel'))(
      dict(tree, c=sharded))
  np.testing.assert_allclose(float(got), _reference(dict(tree, c=sharded)),
                             rtol=1e-6)


def test_kernel_norm_gradient_and_jvp():
  tree = {'w': jnp.asarray([[3.0, 4.0]]), 'b': jnp.asarray([12.0])}
  grad = jax.grad(lambda t: optim.global_norm(t, 'cpu_kernel'))(tree)
  np.testing.assert_allclose(grad['w'], [[3 / 13, 4 / 13]], rtol=1e-6)
  np.testing.assert_allclose(grad['b'], [12 / 13], rtol=1e-6)
  # Under vmap too (the kernel runs once per example).
  batch = jnp.asarray([[3.0, 4.0], [6.0, 8.0]])
  np.testing.assert_allclose(
      jax.vmap(lambda x: optim.global_norm([x], 'cpu_kernel'))(batch),
      [5.0, 10.0], rtol=1e-6)


def test_auto_and_fallbacks():
  tree = _tree()
  # The tests run on 8 devices, where 'auto' keeps optax's reduction.
  assert jax.device_count() > 1
  text = str(jax.make_jaxpr(optim.global_norm)(tree))
  assert 'rsd_sum_squares' not in text
  text = str(jax.make_jaxpr(lambda t: optim.global_norm(t, 'cpu_kernel'))(
      tree))
  assert 'rsd_sum_squares' in text
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
  with pytest.raises(ValueError, match="'cpu_kernel' cannot run: dtypes"):
    optim.global_norm(bf16, 'cpu_kernel')
  with pytest.raises(ValueError, match='grad_norm=.kernel.; expected one'):
    optim.global_norm(tree, 'kernel')
  assert float(optim.global_norm({}, 'cpu_kernel')) == 0.0


def test_clip_matches_optax():
  tree = _tree(2)
  for max_norm in (1.0, 1e4):  # Clipped, and left as it is.
    ours, _ = optim.clip_by_global_norm(max_norm, 'cpu_kernel').update(
        tree, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(
        tree, optax.EmptyState())
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_config_typo_is_an_error():
  config = common.get_base_config().optim
  config.grad_norm = 'cpu-kernel'
  with pytest.raises(ValueError, match='config.optim.grad_norm'):
    optim.create_optimizer(config, total_steps=10)
