"""ops/attention.py: the fused kernels (Pallas, in interpret mode here) equal
the reference, forward and gradient; the choice and its errors."""

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from reverse_sd import sharding
from reverse_sd.ops import attention

# float32 / bfloat16 tolerances of the issue: max abs error against the
# float32 reference on unit-normal inputs.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(queries, keys, dtype, batch=2, heads=2, head_dim=32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, queries, heads, head_dim), dtype)
  k = jax.random.normal(ks[1], (batch, keys, heads, head_dim), dtype)
  v = jax.random.normal(ks[2], (batch, keys, heads, head_dim), dtype)
  cotangent = jax.random.normal(ks[3], q.shape, jnp.float32)
  return q, k, v, cotangent


def _interpret(implementation):
  """Pallas TPU kernels run in interpret mode only inside this context (it
  must cover the gradient's tracing too)."""
  if implementation == attention.PALLAS_TPU:
    return pltpu.force_tpu_interpret_mode()
  return contextlib.nullcontext()


def _value_and_grads(fn, q, k, v, cotangent):
  loss = lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * cotangent).sum()
  out = fn(q, k, v)
  return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _max_errors(got, want):
  (out, grads), (out_ref, grads_ref) = got, want
  pairs = [(out, out_ref)] + list(zip(grads, grads_ref))
  return [float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
          for a, b in pairs]


# (queries, keys, causal): a ViT's padded self-attention, its read-out
# layer (one query), causal text, a U-Net's cross-attention (Q > T).
SHAPES = {
    'vit': (17, 17, False),
    'vit_readout': (1, 17, False),
    'causal': (9, 9, True),
    'cross': (20, 7, False),
}


def _kernel_errors(implementation, shape, dtype):
  """Max abs errors of (out, dq, dk, dv) of the kernel in interpret mode
  against the float32 reference."""
  queries, keys, causal = SHAPES[shape]
  op = attention.choose(implementation, 'cpu', interpret=True)
  q, k, v, cotangent = _inputs(queries, keys, dtype)
  # One jitted computation, finished before anything else is dispatched:
  # the TPU interpreter's host callbacks run JAX ops of their own, which
  # would queue behind (and wait forever for) a computation dispatched after
  # the kernel's.
  kernel = jax.jit(lambda q, k, v: _value_and_grads(
      lambda q, k, v: op(q, k, v, causal=causal), q, k, v, cotangent))
  with _interpret(implementation):
    got = jax.block_until_ready(kernel(q, k, v))
  want = _value_and_grads(
      lambda q, k, v: attention.reference(q, k, v, causal=causal),
      *(x.astype(jnp.float32) for x in (q, k, v)), cotangent)
  return _max_errors(got, want)


_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# The Pallas TPU interpreter simulates the chip with host callbacks and
# process-wide state (shared memory, semaphores): its cases run in a fresh
# one-device process of their own, with a time limit.
_TPU_WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import test_ops_attention as t
print(json.dumps({f'{shape}/{name}': t._kernel_errors('pallas_tpu', shape, dtype)
                  for shape in t.SHAPES for name, dtype in t._DTYPES.items()}))
"""


@pytest.fixture(scope='module')
def tpu_kernel_errors():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  tests_dir = str(pathlib.Path(__file__).parent)
  env['PYTHONPATH'] = os.pathsep.join(
      [str(pathlib.Path(tests_dir).parent), env.get('PYTHONPATH', '')])
  result = subprocess.run([sys.executable, '-c', _TPU_WORKER, tests_dir],
                          capture_output=True, text=True, timeout=300,
                          env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('dtype', sorted(_DTYPES))
@pytest.mark.parametrize('shape', sorted(SHAPES))
def test_tpu_kernel_equals_reference(tpu_kernel_errors, shape, dtype):
  errors = tpu_kernel_errors[f'{shape}/{dtype}']
  assert max(errors) <= TOLERANCE[_DTYPES[dtype]], (
      f'pallas_tpu {shape} {dtype}: max abs error of (out, dq, dk, dv) = '
      f'{errors}')


@pytest.mark.parametrize('dtype', sorted(_DTYPES))
@pytest.mark.parametrize('shape', sorted(SHAPES))
def test_gpu_kernel_equals_reference(shape, dtype):
  if shape == 'cross':
    queries, keys, _ = SHAPES[shape]
    q, k, v, _ = _inputs(queries, keys, _DTYPES[dtype])
    with pytest.raises(ValueError, match='Q <= T'):
      attention.choose('pallas_gpu', 'cpu', interpret=True)(q, k, v)
    return
  errors = _kernel_errors(attention.PALLAS_GPU, shape, _DTYPES[dtype])
  assert max(errors) <= TOLERANCE[_DTYPES[dtype]], (
      f'pallas_gpu {shape} {dtype}: max abs error of (out, dq, dk, dv) = '
      f'{errors}')


def test_xla_implementation_equals_reference():
  q, k, v, cotangent = _inputs(9, 9, jnp.float32)
  op = attention.choose('xla', 'cpu')
  for causal in (False, True):
    errors = _max_errors(
        _value_and_grads(lambda q, k, v: op(q, k, v, causal=causal),
                         q, k, v, cotangent),
        _value_and_grads(
            lambda q, k, v: attention.reference(q, k, v, causal=causal),
            q, k, v, cotangent))
    assert max(errors) <= 1e-5, errors


def test_kernel_under_shard_map_equals_reference():
  """On 8 devices the kernel runs per batch shard (shard_map). The Pallas
  GPU kernel's interpret mode runs here; the TPU one's synchronises its
  simulated devices and would wait on the 8 fake CPU devices' threads, so
  the TPU kernel's sharded path is checked by lowering
  (test_accelerator_lowering.py)."""
  mesh = sharding.make_mesh(('data', 'fsdp'), (4, 2))
  op = attention.choose(attention.PALLAS_GPU, 'cpu', mesh, interpret=True)
  q, k, v, cotangent = _inputs(17, 17, jnp.float32, batch=8)
  fn = jax.jit(lambda q, k, v: _value_and_grads(op, q, k, v, cotangent))
  assert 'shard_map' in str(jax.make_jaxpr(fn)(q, k, v))
  want = _value_and_grads(attention.reference, q, k, v, cotangent)
  assert max(_max_errors(fn(q, k, v), want)) <= 1e-5


@pytest.mark.parametrize('platform,expected', [
    ('cpu', 'xla'), ('tpu', 'pallas_tpu'), ('gpu', 'cudnn'),
    ('cuda', 'cudnn')])
def test_auto_follows_the_platform_not_the_devices(platform, expected):
  one = sharding.make_mesh(('data',), (1,), devices=jax.devices()[:1])
  eight = sharding.make_mesh(('data',), (-1,))
  chosen = {attention.choose('auto', platform, mesh).implementation
            for mesh in (None, one, eight)}
  assert chosen == {expected}


def test_auto_falls_back_to_xla_where_the_kernel_cannot_run():
  op = attention.choose('auto', 'gpu')  # cuDNN: bfloat16/float16 only.
  q, k, v, _ = _inputs(9, 9, jnp.float32)
  assert op.implementation_for(q, k, v) == 'xla'
  assert op.implementation_for(*(x.astype(jnp.bfloat16)
                                 for x in (q, k, v))) == 'cudnn'
  odd = jnp.zeros((1, 9, 2, 36), jnp.bfloat16)  # Head dim not a multiple of 8.
  assert op.implementation_for(odd, odd, odd) == 'xla'
  np.testing.assert_allclose(op(q, k, v), attention.reference(q, k, v),
                             atol=1e-5)


def test_a_named_kernel_that_cannot_run_a_shape_says_so():
  op = attention.choose('cudnn', 'gpu')
  q = jnp.zeros((2, 9, 4, 64), jnp.float32)
  with pytest.raises(ValueError) as error:
    op(q, q, q)
  message = str(error.value)
  for part in ("'cudnn'", '(2, 9, 4, 64)', 'float32', 'bfloat16',
               'Implementations that can: xla'):
    assert part in message, message


@pytest.mark.parametrize('name,platform,match', [
    ('flash', 'cpu', "attention='flash': expected one of"),
    ('pallas_tpu', 'cpu', "cannot run on the cpu backend; it runs: xla"),
    ('cudnn', 'tpu', "cannot run on the tpu backend; it runs: pallas_tpu, "
     'xla'),
    ('pallas_gpu', 'tpu', 'cannot run on the tpu backend'),
])
def test_bad_choices_name_what_can_run(name, platform, match):
  with pytest.raises(ValueError, match=match):
    attention.choose(name, platform)


def test_a_mask_runs_only_on_xla():
  q, k, v, _ = _inputs(5, 5, jnp.float32)
  mask = jnp.tril(jnp.ones((5, 5), jnp.bool_))
  np.testing.assert_allclose(
      attention.choose('xla', 'cpu')(q, k, v, mask=mask),
      attention.reference(q, k, v, causal=True), atol=1e-5)
  with pytest.raises(ValueError, match='no mask'):
    attention.choose('pallas_tpu', 'cpu', interpret=True)(q, k, v, mask=mask)
