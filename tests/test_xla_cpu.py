"""XLA:CPU flags (reverse_sd/xla_cpu.py) and the folded Dense."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reverse_sd import sharding
from reverse_sd import xla_cpu
from reverse_sd.models import dense

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


NO_YNN = '--xla_cpu_experimental_ynn_fusion_type='
ONEDNN = ['--xla_cpu_use_onednn=true',
          '--xla_cpu_experimental_onednn_fusion_type=individual_dot']
ON = {xla_cpu.OPT_IN_ENV: '1'}
OFF = {xla_cpu.DEFAULTS_ENV: '0'}


def test_default_turns_ynnpack_off():
  env = {'XLA_FLAGS': '--a=1'}
  assert xla_cpu.apply_defaults(env, version=(0, 10)) == (
      'xla_cpu_experimental_ynn_fusion_type',)
  assert env['XLA_FLAGS'] == '--a=1 ' + NO_YNN


def test_train_step_options_only_for_one_avx512_cpu_device():
  kw = dict(environ={}, version=(0, 10), backend='cpu', device_count=1)
  assert xla_cpu.train_step_options(avx512=True, **kw) == (
      xla_cpu.TRAIN_STEP_OPTIONS)
  assert not xla_cpu.train_step_options(avx512=False, **kw)
  assert not xla_cpu.train_step_options(
      avx512=True, **dict(kw, device_count=8))
  assert not xla_cpu.train_step_options(avx512=True, **dict(kw, backend='gpu'))
  assert not xla_cpu.train_step_options(avx512=True, **dict(kw, environ=OFF))
  assert not xla_cpu.train_step_options(
      avx512=True, **dict(kw, version=(0, 9)))


def test_a_child_process_tells_our_flags_from_the_users():
  # A child inherits XLA_FLAGS with the default in it; the flags we added
  # are listed, so the child still counts them as ours.
  env = {'XLA_FLAGS': '--a=1'}
  xla_cpu.apply_defaults(env, version=(0, 10))
  assert env[xla_cpu.ADDED_ENV] == 'xla_cpu_experimental_ynn_fusion_type'
  code = ('import reverse_sd\nfrom reverse_sd import xla_cpu\n'
          'print(sorted(xla_cpu._user_flags))\n')
  child = _fresh(code, **{'XLA_FLAGS': env['XLA_FLAGS'],
                          xla_cpu.ADDED_ENV: env[xla_cpu.ADDED_ENV]})
  assert child == ["['a']"]


def test_train_step_options_compile_ynnpack_dots():
  # The option reaches XLA: the product goes to a YNNPACK fusion.
  options = dict(xla_cpu.TRAIN_STEP_OPTIONS)
  f = jax.jit(lambda a, b: jnp.tanh(a @ b), compiler_options=options)
  hlo = f.lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile().as_text()
  assert 'ynn_fusion' in hlo


def test_defaults_off_leaves_flags_alone():
  env = dict(OFF, XLA_FLAGS='--a=1')
  assert not xla_cpu.apply_defaults(env, version=(0, 10))
  assert env['XLA_FLAGS'] == '--a=1'


def test_onednn_flags_added_after_the_default():
  env = dict(ON)
  xla_cpu.apply_defaults(env, version=(0, 10))
  assert env['XLA_FLAGS'].split() == [NO_YNN] + ONEDNN
  env = dict(ON, **OFF)
  xla_cpu.apply_defaults(env, version=(0, 10))
  assert env['XLA_FLAGS'].split() == ONEDNN


def test_user_flags_win_and_are_kept():
  env = dict(ON, XLA_FLAGS='--xla_force_host_platform_device_count=1 '
                           '--xla_cpu_use_onednn=false '
                           '--xla_cpu_experimental_ynn_fusion_type=dot')
  xla_cpu.apply_defaults(env, version=(0, 10))
  flags = env['XLA_FLAGS'].split()
  assert flags == ['--xla_force_host_platform_device_count=1',
                   '--xla_cpu_use_onednn=false',
                   '--xla_cpu_experimental_ynn_fusion_type=dot', ONEDNN[1]]


@pytest.mark.parametrize('env', [
    dict(ON, XLA_FLAGS='--xla_force_host_platform_device_count=8'),
    dict(ON, XLA_FLAGS='', JAX_NUM_CPU_DEVICES='2')])
def test_several_cpu_devices_get_no_onednn(env):
  # oneDNN calls crashed processes running several CPU devices at once;
  # the YNNPACK default applies (this test suite runs with it, 8 devices).
  xla_cpu.apply_defaults(env, version=(0, 10))
  assert 'onednn' not in env['XLA_FLAGS']
  assert NO_YNN in env['XLA_FLAGS'].split()


def test_this_test_process_runs_without_ynnpack_and_onednn():
  # conftest.py asks for 8 devices before reverse_sd is imported.
  assert jax.device_count() == 8
  assert 'onednn' not in os.environ['XLA_FLAGS']
  hlo = jax.jit(jnp.matmul).lower(jnp.ones((6, 5, 4)),
                                  jnp.ones((6, 4, 3))).compile().as_text()
  assert 'ynn_fusion' not in hlo


def test_applying_twice_adds_nothing():
  env = dict(ON)
  xla_cpu.apply_defaults(env, version=(0, 10))
  once = env['XLA_FLAGS']
  xla_cpu.apply_defaults(env, version=(0, 10))
  assert env['XLA_FLAGS'] == once


@pytest.mark.parametrize('value', ['0', 'false', 'No', ''])
def test_other_values_do_not_opt_in(value):
  env = dict(OFF, XLA_FLAGS='--a=1', **{xla_cpu.OPT_IN_ENV: value})
  assert not xla_cpu.apply_defaults(env, version=(0, 10))
  assert env['XLA_FLAGS'] == '--a=1'


def test_unknown_value_warns_and_keeps_the_default():
  env = {xla_cpu.DEFAULTS_ENV: 'O', xla_cpu.OPT_IN_ENV: 'on'}
  with pytest.warns(UserWarning) as record:
    xla_cpu.apply_defaults(env, version=(0, 10))
  messages = ' '.join(str(w.message) for w in record)
  assert xla_cpu.DEFAULTS_ENV in messages and xla_cpu.OPT_IN_ENV in messages
  assert env['XLA_FLAGS'] == NO_YNN  # Defaults on, oneDNN off.


def test_unchecked_jaxlib_gets_nothing():
  # XLA exits on flags it does not know, so other versions are left alone.
  env = dict(ON)
  assert not xla_cpu.apply_defaults(env, version=(0, 9))
  assert not xla_cpu.apply_defaults(env, version=(1, 0))
  assert 'XLA_FLAGS' not in env


def test_installed_jaxlib_is_checked():
  assert xla_cpu.jaxlib_version() in xla_cpu.CHECKED_JAXLIB


def _fresh(code: str, **env_vars) -> list[str]:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  for name in (xla_cpu.OPT_IN_ENV, xla_cpu.DEFAULTS_ENV, xla_cpu.ADDED_ENV):
    env.pop(name, None)
  env.update(env_vars)
  return subprocess.run([sys.executable, '-c', code], env=env, check=True,
                        capture_output=True, text=True).stdout.split()


def test_import_sets_flags_in_a_fresh_process():
  """A fresh process that opts in gets the flags from `import reverse_sd`.

  Nothing is compiled with oneDNN here: its calls aborted even a 6x5x4
  batched matmul in one of the suite's runs (the reason they are opt-in).
  """
  code = 'import os, reverse_sd\nprint(os.environ["XLA_FLAGS"])\n'
  assert _fresh(code, **ON) == [NO_YNN] + ONEDNN


_COMPILED = ('import os, reverse_sd, jax, jax.numpy as jnp\n'
             'hlo = jax.jit(jnp.matmul).lower(jnp.ones((64, 64)), '
             'jnp.ones((64, 64))).compile().as_text()\n'
             'print("onednn" in hlo, "ynn_fusion" in hlo)\n')


def test_default_fresh_process_compiles_without_ynnpack_or_onednn():
  assert _fresh(_COMPILED) == ['False', 'False']


def test_fresh_process_train_step_options():
  # One device: the train step's options follow the CPU; a YNNPACK flag of
  # the user's turns them off.
  code = ('import reverse_sd\nfrom reverse_sd import xla_cpu\n'
          'print(bool(xla_cpu.train_step_options()))\n')
  assert _fresh(code) == [str(xla_cpu.cpu_has_avx512())]
  assert _fresh(code, XLA_FLAGS=NO_YNN) == ['False']


def test_defaults_off_keeps_xla_choice():
  # XLA's own default puts this product in a YNNPACK fusion.
  assert _fresh(_COMPILED, **OFF) == ['False', 'True']


@pytest.mark.parametrize('shape', [(5, 7), (2, 3, 7), (2, 3, 4, 7)])
def test_dense_matches_flax_dense(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  params = nn.Dense(6).init(jax.random.key(1), x)
  ours = dense.Dense(6)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == (
      jax.tree.map(jnp.shape, params))

  def loss(module, p):
    return jnp.sum(jnp.sin(module.apply(p, x)))

  want, want_grad = jax.value_and_grad(lambda p: loss(nn.Dense(6), p))(params)
  got, got_grad = jax.value_and_grad(lambda p: loss(ours, p))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               got_grad, want_grad)


def test_dense_keeps_batch_sharding():
  mesh = jax.make_mesh((8,), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      'data'))
  x = jax.device_put(jnp.ones((8, 5, 4)), sharding)
  module = dense.Dense(3)
  params = module.init(jax.random.key(0), x)
  out = jax.jit(module.apply)(params, x)
  assert out.shape == (8, 5, 3)
  assert out.sharding.spec[0] == 'data'


def test_bias_gradient_is_a_product_and_keeps_its_value():
  # On CPU the bias gradient is ones @ dy (dense.add_bias), the same value as
  # the column sum, on a batch sharded over the 8 devices too (the project's
  # meshes: automatic axes).
  mesh = sharding.make_mesh(('data',), (8,))
  x = jax.random.normal(jax.random.key(0), (16, 5, 4))
  w = jax.random.normal(jax.random.key(1), (16, 5, 3))
  sharded = [jax.device_put(a, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data'))) for a in (x, w)]
  params = nn.Dense(3).init(jax.random.key(2), x)
  grad = lambda m: jax.jit(jax.grad(
      lambda p, x, w: jnp.sum(m.apply(p, x) * w)))
  got = grad(dense.Dense(3))(params, *sharded)
  want = grad(nn.Dense(3))(params, x, w)
  np.testing.assert_allclose(got['params']['bias'], want['params']['bias'],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got['params']['bias'],
                             np.sum(np.asarray(w), axis=(0, 1)), rtol=1e-5,
                             atol=1e-5)
  text = jax.jit(jax.grad(lambda b, y: jnp.sum(dense.add_bias(y, b) * y)))
  hlo = text.lower(jnp.zeros(3), x[..., :3]).compile().as_text()
  assert ' dot(' in hlo and 'reduce' not in hlo, hlo
  bf16 = jax.grad(lambda b: jnp.sum(dense.add_bias(
      jnp.ones((4, 3), jnp.bfloat16), b)))(jnp.zeros(3, jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16 and np.all(np.asarray(bf16) == 4)


def test_bias_gradient_on_an_explicitly_sharded_batch():
  # Explicit mesh axes: the product of the replicated ones with the sharded
  # rows must still get its sharding from JAX.
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  y = jax.random.normal(jax.random.key(0), (16, 5, 3))
  w = jax.random.normal(jax.random.key(1), (16, 5, 3))
  sharded = [jax.device_put(a, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data'))) for a in (y, w)]
  grad = jax.jit(jax.grad(lambda b, y, w: jnp.sum(dense.add_bias(y, b) * w)))
  np.testing.assert_allclose(grad(jnp.zeros(3), *sharded),
                             np.sum(np.asarray(w), axis=(0, 1)), rtol=1e-5,
                             atol=1e-5)


def test_flat_dot_general_leaves_other_patterns_alone():
  a = jnp.ones((2, 3, 4))
  b = jnp.ones((2, 4, 5))
  batched = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(
      dense.flat_dot_general(a, b, batched),
      jax.lax.dot_general(a, b, batched))
