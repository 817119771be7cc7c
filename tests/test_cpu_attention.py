"""The fused CPU attention kernel against jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from reverse_sd.models import cpu_attention
from reverse_sd.models import cpu_kernels
from reverse_sd.models import reverse_model
from reverse_sd.models import vit

# Tolerances: float32, sums of up to a few hundred terms.
ATOL = 2e-5


def _inputs(batch, queries, keys, heads, dim, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, queries, heads, dim)).astype(np.float32)
  k = rng.normal(size=(batch, keys, heads, dim)).astype(np.float32)
  v = rng.normal(size=(batch, keys, heads, dim)).astype(np.float32)
  w = rng.normal(size=(batch, queries, heads, dim)).astype(np.float32)
  return q, k, v, w


def _value_and_grads(impl, q, k, v, w):
  def loss(q, k, v):
    out = cpu_attention.attention(q, k, v, impl=impl)
    return jnp.sum(out * w), out
  (_, out), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def test_kernel_builds_here():
  # CI's machine has g++ and AVX2: the kernel must be what 'auto' runs.
  assert cpu_kernels.unavailable_reason() is None
  q, k, v, _ = _inputs(1, 4, 4, 2, 8)
  assert 'rsd_attention_forward' in str(jax.make_jaxpr(
      cpu_attention.attention)(q, k, v))


@pytest.mark.parametrize('shape', [
    (2, 9, 9, 3, 16),     # B, Q, T, H, D: Q == T, neither a multiple of 8.
    (3, 17, 17, 2, 64),   # ViT-B/16's head size.
    (2, 1, 13, 4, 32),    # one query (the ViT's last layer: class token).
    (1, 5, 11, 2, 12),    # head size not a multiple of 8.
    (2, 40, 24, 1, 40),   # more queries than keys (cross-attention shapes).
])
def test_values_and_gradients_match_xla(shape):
  batch, queries, keys, heads, dim = shape
  q, k, v, w = _inputs(batch, queries, keys, heads, dim)
  out, grads = _value_and_grads('cpu_kernel', q, k, v, w)
  ref_out, ref_grads = _value_and_grads('xla', q, k, v, w)
  np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=1e-5)
  for name, got, want in zip('qkv', grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5,
                               err_msg=f'd{name}')


def test_large_logits_stay_finite():
  # Logits of +-1e3: the softmax must subtract the row maximum.
  q, k, v, w = _inputs(2, 8, 8, 2, 16, seed=1)
  q = q * 200.0
  out, grads = _value_and_grads('cpu_kernel', q, k, v, w)
  ref_out, ref_grads = _value_and_grads('xla', q, k, v, w)
  assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
  np.testing.assert_allclose(out, ref_out, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(grads[2], ref_grads[2], atol=1e-4, rtol=1e-4)


def test_batch_sharded_over_8_devices():
  # Registered as batch partitionable: each device runs its batch slice.
  mesh = jax.make_mesh((8,), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  q, k, v, w = _inputs(16, 7, 7, 2, 8, seed=2)
  sharded = [jax.device_put(x, sharding) for x in (q, k, v, w)]
  out, grads = _value_and_grads('cpu_kernel', *sharded)
  ref_out, ref_grads = _value_and_grads('xla', q, k, v, w)
  assert out.sharding.spec[0] == 'data'
  np.testing.assert_allclose(out, ref_out, atol=ATOL, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


def test_vmap_runs_sequentially():
  q, k, v, _ = _inputs(2, 5, 5, 2, 8, seed=3)
  stacked = [np.stack([x, 2 * x]) for x in (q, k, v)]
  got = jax.vmap(lambda a, b, c: cpu_attention.attention(
      a, b, c, impl='cpu_kernel'))(*stacked)
  want = jax.vmap(lambda a, b, c: cpu_attention.attention(
      a, b, c, impl='xla'))(*stacked)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)


def test_masked_and_bfloat16_fall_back_in_auto():
  q, k, v, _ = _inputs(1, 4, 4, 2, 8)
  mask = np.tril(np.ones((4, 4), bool))
  got = cpu_attention.attention(q, k, v, mask=mask)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(got, want, atol=1e-6)
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  assert cpu_attention.attention(*bf16).dtype == jnp.bfloat16


def test_cpu_kernel_says_why_it_cannot_run():
  q, k, v, _ = _inputs(1, 4, 4, 2, 8)
  with pytest.raises(ValueError, match='cannot run: a mask'):
    cpu_attention.attention(q, k, v, mask=np.ones((4, 4), bool),
                            impl='cpu_kernel')
  with pytest.raises(ValueError, match='float32'):
    cpu_attention.attention(*[jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)],
                            impl='cpu_kernel')
  with pytest.raises(ValueError, match="'fused'.*expected one of"):
    cpu_attention.attention(q, k, v, impl='fused')


def test_vit_is_the_same_function_with_either_impl():
  # Attention and LayerNorms (models/layer_norm.py) both.
  cfg = vit.VARIANTS['tiny']
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model = {impl: vit.VisionTransformer(cfg, attention=impl, layer_norm=impl)
           for impl in ('xla', 'cpu_kernel')}
  params = jax.jit(model['xla'].init)(jax.random.key(1), images)
  # A random read-out (a sum of squares of the LayerNorm-ed output would be
  # nearly constant, its gradients float32 rounding).
  w = jax.random.normal(jax.random.key(2), (2, cfg.width))

  def loss(impl, params):
    return jnp.sum(model[impl].apply(params, images) * w)
  got = jax.jit(jax.value_and_grad(lambda p: loss('cpu_kernel', p)))(params)
  want = jax.jit(jax.value_and_grad(lambda p: loss('xla', p)))(params)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5,
                                                       rtol=1e-4),
               got[1], want[1])


def test_config_typo_is_an_error():
  config = ml_collections.ConfigDict(dict(
      backbone='vit', variant='tiny', dtype='float32', head_hidden=(),
      image_mean=(0.5,) * 3, image_std=(0.5,) * 3, attention='fused'))
  with pytest.raises(ValueError, match="config.model.attention='fused'"):
    reverse_model.create_model(config)
