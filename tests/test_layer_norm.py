"""The fused CPU LayerNorm kernel against flax.linen.LayerNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from reverse_sd.models import layer_norm
from reverse_sd.models import reverse_model


def _inputs(shape, seed=0, offset=0.0):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=shape) * 2 + offset).astype(np.float32)
  w = rng.normal(size=shape).astype(np.float32)  # A random read-out.
  params = {'params': {
      'scale': (1 + 0.3 * rng.normal(size=shape[-1:])).astype(np.float32),
      'bias': (0.3 * rng.normal(size=shape[-1:])).astype(np.float32)}}
  return x, w, params


def _value_and_grads(module, params, x, w):
  def loss(params, x):
    y = module.apply(params, x)
    return jnp.sum(y * w), y
  (_, y), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(params, x)
  return y, grads


def _reference(x, w, params, eps):
  """LayerNorm's value and gradients in float64 numpy."""
  x = x.astype(np.float64)
  scale, bias = (params['params'][k].astype(np.float64)
                 for k in ('scale', 'bias'))
  mean = x.mean(-1, keepdims=True)
  xc = x - mean
  rstd = 1 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
  xhat = xc * rstd
  g = w * scale
  dx = rstd * (g - g.mean(-1, keepdims=True) -
               xhat * (g * xhat).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return xhat * scale + bias, {'params': {
      'scale': (w * xhat).sum(rows), 'bias': w.sum(rows)}}, dx


@pytest.mark.parametrize('shape', [
    (2, 5, 40),    # [B, T, D], D a multiple of 8.
    (3, 13),       # D not a multiple of 8.
    (7,),          # one row.
])
def test_values_and_gradients_match_float64(shape):
  eps = 1e-5
  x, w, params = _inputs(shape)
  y, (dparams, dx) = _value_and_grads(
      layer_norm.LayerNorm(epsilon=eps, impl='cpu_kernel'), params, x, w)
  want_y, want_dparams, want_dx = _reference(x, w, params, eps)
  np.testing.assert_allclose(y, want_y, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(dx, want_dx, atol=1e-5, rtol=1e-4)
  for name in ('scale', 'bias'):
    np.testing.assert_allclose(dparams['params'][name],
                               want_dparams['params'][name], atol=1e-4,
                               rtol=1e-5, err_msg=name)
  # And flax's LayerNorm (the 'xla' impl) agrees on the same parameters.
  flax_y, _ = _value_and_grads(layer_norm.LayerNorm(epsilon=eps, impl='xla'),
                               params, x, w)
  np.testing.assert_allclose(y, flax_y, atol=1e-5, rtol=1e-5)


def test_large_offset_keeps_the_variance():
  # Rows of mean 3e3 and std 2: the kernel's two-pass variance stays exact
  # where E[x^2] - E[x]^2 loses most of float32's digits.
  x, w, params = _inputs((4, 64), seed=1, offset=3e3)
  y, (_, dx) = _value_and_grads(
      layer_norm.LayerNorm(epsilon=1e-6, impl='cpu_kernel'), params, x, w)
  want_y, _, want_dx = _reference(x, w, params, 1e-6)
  np.testing.assert_allclose(y, want_y, atol=5e-4)
  np.testing.assert_allclose(dx, want_dx, atol=5e-4, rtol=1e-3)


def test_same_parameters_as_flax():
  x, _, _ = _inputs((2, 3, 16))
  got = layer_norm.LayerNorm(impl='cpu_kernel').init(jax.random.key(0), x)
  want = nn.LayerNorm().init(jax.random.key(0), x)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jax.tree.all(jax.tree.map(np.array_equal, got, want))


def test_batch_sharded_over_8_devices():
  # Not batch partitionable (dscale and dbias sum over the batch): GSPMD
  # runs it on gathered operands; the values must not change.
  mesh = jax.make_mesh((8,), ('data',))
  x, w, params = _inputs((16, 3, 24), seed=2)
  sharded = [jax.device_put(a, NamedSharding(mesh, P('data')))
             for a in (x, w)]
  module = layer_norm.LayerNorm(impl='cpu_kernel')
  y, grads = _value_and_grads(module, params, *sharded)
  want_y, want_grads = _value_and_grads(
      layer_norm.LayerNorm(impl='xla'), params, x, w)
  np.testing.assert_allclose(y, want_y, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4,
                                                       rtol=1e-5),
               grads, want_grads)


def test_vmap_runs_sequentially():
  x, _, params = _inputs((3, 5, 16), seed=3)
  apply = lambda impl: jax.vmap(
      lambda a: layer_norm.LayerNorm(impl=impl).apply(params, a))(x)
  np.testing.assert_allclose(apply('cpu_kernel'), apply('xla'), atol=1e-5)


def test_auto_picks_flax_where_the_kernel_does_not_apply():
  x, _, params = _inputs((2, 4, 16))
  text = lambda module, a: str(jax.make_jaxpr(
      lambda a: module.apply(params, a))(a))
  # The tests run on 8 devices: 'auto' keeps XLA's ops there.
  assert 'rsd_layer_norm' not in text(layer_norm.LayerNorm(), x)
  assert 'rsd_layer_norm' in text(layer_norm.LayerNorm(impl='cpu_kernel'), x)
  bf16 = layer_norm.LayerNorm(dtype=jnp.bfloat16)
  assert bf16.apply(params, x).dtype == jnp.bfloat16


def test_cpu_kernel_says_why_it_cannot_run():
  x, _, params = _inputs((2, 4, 16))
  with pytest.raises(ValueError, match='cannot run: dtype'):
    layer_norm.LayerNorm(impl='cpu_kernel').apply(
        params, jnp.asarray(x, jnp.bfloat16))
  with pytest.raises(ValueError, match='cannot run: reduction_axes'):
    layer_norm.LayerNorm(impl='cpu_kernel', reduction_axes=(1, 2)).init(
        jax.random.key(0), x)
  with pytest.raises(ValueError, match="'fused'.*expected one of"):
    layer_norm.LayerNorm(impl='fused').apply(params, x)


def test_config_typo_is_an_error():
  config = ml_collections.ConfigDict(dict(
      backbone='vit', variant='tiny', dtype='float32', head_hidden=(),
      image_mean=(0.5,) * 3, image_std=(0.5,) * 3, attention='auto',
      layer_norm='fused'))
  with pytest.raises(ValueError, match="config.model.layer_norm='fused'"):
    reverse_model.create_model(config)
