"""models/conv.py: the matmul and FFI-kernel backward passes equal XLA's
convolution gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reverse_sd import sharding
from reverse_sd.models import conv

# (input HxW, C_in, C_out, kernel, strides, padding): the shapes the models
# use (stride-2 SAME in the ConvNet, diffusers' padding-1 3x3 and the
# (0, 1)-padded downsampler, 1x1 shortcuts, non-overlapping patches) on odd
# sizes so the SAME padding is asymmetric.
CASES = [
    ((9, 7), 3, 5, (3, 3), (2, 2), 'SAME'),
    ((8, 8), 4, 6, (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((9, 9), 4, 4, (3, 3), (2, 2), ((0, 1), (0, 1))),
    ((6, 5), 4, 3, (1, 1), (1, 1), 'VALID'),
    ((8, 12), 3, 7, (4, 4), (4, 4), 'VALID'),
    ((9, 13), 3, 7, (4, 4), (4, 4), 'VALID'),
    ((7, 7), 2, 3, (2, 3), (1, 2), 'SAME'),
    # Channels that fill the FFI kernel's 6x16 register blocks and leave
    # remainders (7 = 6 + 1 input, 25 = 16 + 8 + 1 output channels).
    ((11, 10), 7, 25, (3, 3), (2, 2), 'SAME'),
    ((8, 8), 13, 32, (3, 3), (3, 3), ((2, 0), (1, 2))),
    # A crop (negative padding) and a kernel larger than the stride.
    ((9, 9), 3, 8, (5, 5), (2, 2), ((-1, 1), (2, -1))),
]
IMPLS = ('matmul', 'cpu_kernel')


def _inputs(hw, c_in, c_out, kernel, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(2, *hw, c_in)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(*kernel, c_in, c_out)), jnp.float32)
  dy_seed = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
  return x, k, dy_seed


def _loss(fn):
  def loss(x, k, dy_seed):
    y = fn(x, k)
    weights = jnp.resize(dy_seed, y.shape)  # A fixed, non-uniform cotangent.
    return jnp.sum(y * weights)
  return loss


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('case', CASES,
                         ids=lambda c: f'{c[1]}to{c[2]}k{c[3]}s{c[4]}{c[5]}')
def test_gradients_equal_xla(case, impl):
  hw, c_in, c_out, kernel, strides, padding = case
  x, k, dy_seed = _inputs(hw, c_in, c_out, kernel)
  grads = {}
  for impl in ('xla', impl):
    fn = lambda x, k, impl=impl: conv.conv2d(x, k, strides, padding, impl)
    y = jax.jit(fn)(x, k)
    grads[impl] = (y, *jax.jit(jax.grad(_loss(fn), argnums=(0, 1)))(
        x, k, dy_seed))
  for name, a, b in zip(('output', 'dx', 'dkernel'), grads['xla'],
                        grads[impl]):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5,
                               err_msg=f'{name} differs from XLA')


def test_module_is_a_drop_in_for_flax_conv():
  x, _, dy_seed = _inputs((9, 7), 3, 5, (3, 3))
  ours = conv.Conv(5, (3, 3), strides=2, padding='SAME', grad_impl='matmul')
  theirs = nn.Conv(5, (3, 3), strides=2, padding='SAME')
  params = theirs.init(jax.random.key(0), x)
  params_ours = ours.init(jax.random.key(0), x)
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), params) ==
          jax.tree.map(lambda a: (a.shape, a.dtype), params_ours))
  np.testing.assert_array_equal(params['params']['kernel'],
                                params_ours['params']['kernel'])

  def loss(module):
    return lambda p: jnp.sum(module.apply(p, x) * jnp.resize(dy_seed, (
        2, 5, 4, 5)))

  g_theirs = jax.grad(loss(theirs))(params)
  g_ours = jax.grad(loss(ours))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5,
                                                       atol=1e-5),
               g_theirs, g_ours)


def test_bfloat16_close_to_float32():
  x, k, dy_seed = _inputs((8, 8), 8, 8, (3, 3))
  fn = lambda x, k: conv.conv2d(x, k, (2, 2), 'SAME', 'matmul')
  g32 = jax.grad(_loss(fn), argnums=1)(x, k, dy_seed)
  g16 = jax.grad(_loss(fn), argnums=1)(x.astype(jnp.bfloat16),
                                       k.astype(jnp.bfloat16), dy_seed)
  assert g16.dtype == jnp.bfloat16
  np.testing.assert_allclose(g16.astype(jnp.float32), g32, rtol=0.05,
                             atol=0.05 * float(jnp.abs(g32).max()))


@pytest.mark.parametrize('impl', IMPLS)
def test_sharded_batch_gives_the_same_gradients(impl):
  mesh = sharding.make_mesh(('data',), (-1,))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 9, 9, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  dy_seed = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
  fn = lambda x, k: conv.conv2d(x, k, (2, 2), 'SAME', impl)
  grad = jax.grad(_loss(fn), argnums=(0, 1))
  expected = jax.jit(grad)(x, k, dy_seed)
  x_sharded = jax.device_put(x, sharding.batch_sharding(mesh))
  got = jax.jit(grad, in_shardings=(sharding.batch_sharding(mesh),
                                    sharding.replicated(mesh),
                                    sharding.replicated(mesh)))(
                                        x_sharded, k, dy_seed)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_vmapped_kernel_gradients():
  x, k, dy_seed = _inputs((9, 7), 3, 5, (3, 3))
  xs = jnp.stack([x, 2 * x])
  grads = {}
  for impl in ('xla', 'cpu_kernel'):
    fn = lambda x, k, impl=impl: conv.conv2d(x, k, (2, 2), 'SAME', impl)
    grads[impl] = jax.vmap(jax.grad(_loss(fn), argnums=(0, 1)),
                           in_axes=(0, None, None))(xs, k, dy_seed)
  for a, b in zip(grads['xla'], grads['cpu_kernel']):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_auto_on_cpu():
  x, k, _ = _inputs((9, 7), 3, 5, (3, 3))
  # The tests' 8 fake devices: the FFI kernel's batch sum would gather the
  # batch, so 'auto' takes the per-tap matrix products; on one device
  # (benchmarks, the main job on this machine) the kernel.
  assert jax.device_count() == 8
  assert conv.resolve_grad_impl('auto', x, k) == 'matmul'
  assert conv.resolve_grad_impl('auto') == 'matmul'
  with pytest.raises(ValueError, match="'cpu_kernel' cannot run: dtype"):
    conv.conv2d(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                grad_impl='cpu_kernel')


def test_bad_values_are_named():
  with pytest.raises(ValueError, match="grad_impl 'fast'"):
    conv.resolve_grad_impl('fast')
  with pytest.raises(ValueError, match="padding 'FULL'"):
    conv.explicit_padding('FULL', (4, 4), (3, 3), (1, 1))
  with pytest.raises(ValueError, match='NHWC'):
    conv.Conv(3, (3, 3)).init(jax.random.key(0), jnp.zeros((4, 4, 3)))


@pytest.mark.parametrize('activation', (None, 'relu'))
@pytest.mark.parametrize('case', CASES,
                         ids=lambda c: f'{c[1]}to{c[2]}k{c[3]}s{c[4]}{c[5]}')
def test_fused_forward_equals_xla(case, activation):
  # The FFI forward pass (convolution, bias and ReLU in one call) and its
  # gradients against XLA's convolution, bias add and ReLU.
  hw, c_in, c_out, kernel, strides, padding = case
  x, k, dy_seed = _inputs(hw, c_in, c_out, kernel)
  bias = jnp.asarray(np.random.default_rng(2).normal(size=(c_out,)),
                     jnp.float32)
  results = {}
  for impl in ('xla', 'cpu_kernel'):
    def fn(x, k, b, impl=impl):
      return conv.conv_bias_act(x, k, b, strides, padding, activation, impl)
    def loss(x, k, b, fn=fn):
      y = fn(x, k, b)
      return jnp.sum(y * jnp.resize(dy_seed, y.shape))
    jaxpr = str(jax.make_jaxpr(fn)(x, k, bias))
    assert ('rsd_conv_forward' in jaxpr) == (impl == 'cpu_kernel')
    results[impl] = (jax.jit(fn)(x, k, bias),
                     *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, k, bias))
  for name, a, b in zip(('output', 'dx', 'dkernel', 'dbias'),
                        results['xla'], results['cpu_kernel']):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-5,
                               err_msg=f'{name} differs from XLA')
  if activation == 'relu':
    assert float(jnp.min(results['cpu_kernel'][0])) == 0.0


def test_fused_forward_without_bias_and_sharded():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(8, 12, 12, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 16, 48)), jnp.float32)
  want = jax.nn.relu(conv.conv2d(x, k, (2, 2), 'SAME', 'xla'))
  fn = lambda x, k: conv.conv_bias_act(x, k, None, (2, 2), 'SAME', 'relu',
                                       'cpu_kernel')
  np.testing.assert_allclose(jax.jit(fn)(x, k), want, rtol=1e-5, atol=1e-5)
  mesh = sharding.make_mesh(('data',), (-1,))
  got = jax.jit(fn, in_shardings=(sharding.batch_sharding(mesh),
                                  sharding.replicated(mesh)))(
                                      jax.device_put(
                                          x, sharding.batch_sharding(mesh)), k)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_module_activation_matches_flax_conv_then_relu():
  x, _, dy_seed = _inputs((9, 7), 3, 32, (3, 3))
  theirs = nn.Conv(32, (3, 3), strides=2, padding='SAME')
  params = theirs.init(jax.random.key(0), x)
  want = jax.nn.relu(theirs.apply(params, x))
  for impl in ('matmul', 'cpu_kernel'):
    ours = conv.Conv(32, (3, 3), strides=2, padding='SAME', grad_impl=impl,
                     activation='relu')
    np.testing.assert_allclose(ours.apply(params, x), want, rtol=1e-5,
                               atol=1e-5)
  with pytest.raises(ValueError, match="activation 'gelu'"):
    conv.Conv(4, (3, 3), activation='gelu').init(jax.random.key(0), x)


def test_large_kernels_keep_xla_forward():
  x = jnp.zeros((1, 4, 4, 320), jnp.float32)
  k = jnp.zeros((3, 3, 320, 320), jnp.float32)  # 3.7 MB > the limit.
  assert k.size * 4 > conv.FORWARD_KERNEL_MAX_BYTES
  fn = lambda x, k: conv.conv_bias_act(x, k, None, (1, 1), 'SAME', 'relu',
                                       'cpu_kernel')
  text = str(jax.make_jaxpr(jax.grad(lambda x, k: fn(x, k).sum(),
                                     argnums=1))(x, k))
  assert 'rsd_conv_forward' not in text
  assert 'rsd_conv_kernel_grad' in text
