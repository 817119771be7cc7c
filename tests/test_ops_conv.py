"""ops/conv.py: the CPU kernel equals `reference` ('xla') on one device and on
a mesh, the module is a drop-in for `nn.Conv`, and the choice of
implementation follows the config and the backend, never the device count."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from configs import synthetic
from reverse_sd import sharding
from reverse_sd.models import reverse_model
from reverse_sd.ops import conv as conv_ops
from reverse_sd.ops.cpu import kernels as cpu_kernels

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
    # Channels that fill the kernel's 6x16 register blocks and leave
    # remainders (7 = 6 + 1 input, 25 = 16 + 8 + 1 output channels).
    ((11, 10), 7, 25, (3, 3), (2, 2), 'SAME'),
    ((8, 8), 13, 32, (3, 3), (3, 3), ((2, 0), (1, 2))),
    # A crop (negative padding) and a kernel larger than the stride.
    ((9, 9), 3, 8, (5, 5), (2, 2), ((-1, 1), (2, -1))),
]
# (activation, use_bias): the ConvNet's relu with bias, the linear
# shortcut without, and the other two.
EPILOGUES = [('relu', True), (None, False), (None, True), ('relu', False)]
KERNEL_OP = conv_ops.ConvOp(conv_ops.CPU_KERNEL, strict=True)
XLA_OP = conv_ops.ConvOp(conv_ops.XLA)
TOLERANCE = dict(rtol=1e-5, atol=2e-5)


def _case_id(case):
  hw, c_in, c_out, kernel, strides, padding = case
  if not isinstance(padding, str):
    padding = 'pad' + '_'.join(f'{lo}:{hi}' for lo, hi in padding)
  return (f'{hw[0]}x{hw[1]}_{c_in}to{c_out}_k{kernel[0]}x{kernel[1]}'
          f'_s{strides[0]}x{strides[1]}_{padding}')


@pytest.fixture
def kernels():
  """Skips a test that runs the CPU kernel where it cannot build or load."""
  reason = cpu_kernels.unavailable_reason()
  if reason is not None:
    pytest.skip(f'CPU conv kernel unavailable: {reason}')


def _inputs(hw, c_in, c_out, kernel, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, *hw, c_in)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(*kernel, c_in, c_out)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(c_out,)), jnp.float32)
  cotangent_seed = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
  return x, k, b, cotangent_seed


def _values_and_grads(op, strides, padding, activation, use_bias):
  """fn(x, k, b, seed) -> (y, dx, dkernel, dbias) under a fixed, non-uniform
  cotangent (dbias is zeros without a bias)."""
  def forward(x, k, b):
    return op(x, k, b if use_bias else None, strides, padding, activation)

  def loss(x, k, b, cotangent_seed):
    y = forward(x, k, b)
    return jnp.sum(y * jnp.resize(cotangent_seed, y.shape))

  grads = jax.grad(loss, argnums=(0, 1, 2))
  return lambda x, k, b, s: (forward(x, k, b), *grads(x, k, b, s))


def _assert_close(got, want, what):
  for name, a, b in zip(('output', 'dx', 'dkernel', 'dbias'), got, want):
    np.testing.assert_allclose(
        a, b, **TOLERANCE,
        err_msg=f'{what}: the CPU kernel\'s {name} differs from xla '
        '(reverse_sd/ops/cpu/conv.cc)')


# --- The kernel's numbers -----------------------------------------------------


@pytest.mark.parametrize('activation,use_bias', EPILOGUES)
@pytest.mark.parametrize('case', CASES, ids=_case_id)
@pytest.mark.usefixtures('kernels')
def test_kernel_equals_reference(case, activation, use_bias):
  hw, c_in, c_out, kernel, strides, padding = case
  args = _inputs(hw, c_in, c_out, kernel)
  results = {}
  for op in (XLA_OP, KERNEL_OP):
    fn = _values_and_grads(op, strides, padding, activation, use_bias)
    text = jax.jit(fn).lower(*args).as_text()
    assert ('rsd_conv_forward' in text) == (op is KERNEL_OP)
    results[op.implementation] = jax.jit(fn)(*args)
  _assert_close(results['cpu_kernel'], results['xla'], _case_id(case))
  if activation == 'relu':
    assert float(jnp.min(results['cpu_kernel'][0])) == 0.0


@pytest.mark.usefixtures('kernels')
def test_vmapped_kernel_equals_reference():
  x, k, b, seed = _inputs((9, 7), 3, 5, (3, 3))
  xs = jnp.stack([x, 2 * x])
  results = [
      jax.vmap(_values_and_grads(op, (2, 2), 'SAME', 'relu', True),
               in_axes=(0, None, None, None))(xs, k, b, seed)
      for op in (XLA_OP, KERNEL_OP)]
  _assert_close(results[1], results[0], 'vmap')


@pytest.mark.usefixtures('kernels')
def test_large_kernels_keep_xla_forward_and_match():
  x, k, b, seed = _inputs((4, 4), 320, 320, (3, 3), batch=1)
  assert k.size * 4 > conv_ops.FORWARD_KERNEL_MAX_BYTES  # 3.7 MB.
  k = k * 0.05  # Keep the sums near the inputs' scale for the tolerance.
  fn = _values_and_grads(KERNEL_OP, (1, 1), 'SAME', 'relu', True)
  text = str(jax.make_jaxpr(fn)(x, k, b, seed))
  assert 'rsd_conv_forward' not in text
  assert 'rsd_conv_kernel_grad' in text and 'rsd_conv_input_grad' in text
  want = jax.jit(_values_and_grads(XLA_OP, (1, 1), 'SAME', 'relu', True))(
      x, k, b, seed)
  got = jax.jit(fn)(x, k, b, seed)
  for name, a, c in zip(('output', 'dx', 'dkernel', 'dbias'), got, want):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-3,
                               err_msg=f'{name} differs from xla')


# --- On a mesh ----------------------------------------------------------------


MESHES = {
    'data8': (('data',), (-1,)),
    'data4_fsdp2': (('data', 'fsdp'), (4, 2)),
}


@pytest.mark.parametrize('mesh_name', MESHES)
@pytest.mark.usefixtures('kernels')
def test_kernel_on_a_mesh_equals_reference(mesh_name):
  mesh = sharding.make_mesh(*MESHES[mesh_name])
  assert mesh.size == 8
  op = conv_ops.ConvOp(conv_ops.CPU_KERNEL, strict=True, mesh=mesh)
  batch_axes = tuple(a for a in conv_ops.BATCH_AXES if a in mesh.axis_names)
  rows = NamedSharding(mesh, P(batch_axes))
  replicated = sharding.replicated(mesh)
  x, k, b, seed = _inputs((9, 9), 7, 25, (3, 3), batch=16, seed=1)
  want = jax.jit(_values_and_grads(XLA_OP, (2, 2), 'SAME', 'relu', True))(
      x, k, b, seed)
  step = jax.jit(_values_and_grads(op, (2, 2), 'SAME', 'relu', True),
                 in_shardings=(rows, replicated, replicated, replicated))
  args = (jax.device_put(x, rows), k, b, seed)
  text = step.lower(*args).as_text()
  for target in cpu_kernels.TARGETS:
    assert target in text, f'{target} missing from the lowered step'
  got = step(*args)
  _assert_close(got, want, f'mesh {mesh_name}')
  # The output and dx stay split over the batch; the parameter gradients
  # are whole on every device (the kernel's psum).
  assert got[0].sharding.is_equivalent_to(rows, got[0].ndim)
  for grad in got[2:]:
    assert grad.sharding.is_fully_replicated


# --- The module ---------------------------------------------------------------


@pytest.mark.parametrize('implementation', conv_ops.IMPLEMENTATIONS)
def test_module_is_a_drop_in_for_flax_conv(implementation):
  if implementation == conv_ops.CPU_KERNEL:
    reason = cpu_kernels.unavailable_reason()
    if reason is not None:
      pytest.skip(f'CPU conv kernel unavailable: {reason}')
  x, _, _, seed = _inputs((9, 7), 3, 5, (3, 3))
  ours = conv_ops.Conv(5, (3, 3), strides=2, padding='SAME',
                       op=conv_ops.ConvOp(implementation, strict=True))
  theirs = nn.Conv(5, (3, 3), strides=2, padding='SAME')
  params = theirs.init(jax.random.key(0), x)
  params_ours = ours.init(jax.random.key(0), x)
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), params) ==
          jax.tree.map(lambda a: (a.shape, a.dtype), params_ours))
  jax.tree.map(np.testing.assert_array_equal, params, params_ours)
  params = jax.tree.map(lambda a: a + 0.1, params)  # A non-zero bias.
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x),
                             **TOLERANCE)

  def loss(module):
    return lambda p: jnp.sum(module.apply(p, x) * jnp.resize(seed, (
        2, 5, 4, 5)))

  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, **TOLERANCE),
               jax.grad(loss(theirs))(params), jax.grad(loss(ours))(params))
  relu = conv_ops.Conv(5, (3, 3), strides=2, padding='SAME',
                       activation='relu', op=ours.op)
  np.testing.assert_allclose(relu.apply(params, x),
                             jax.nn.relu(theirs.apply(params, x)), **TOLERANCE)


# --- Dtypes and bad values ----------------------------------------------------


@pytest.mark.usefixtures('kernels')
def test_bfloat16_falls_back_to_xla_unless_strict():
  op = conv_ops.choose('auto', 'cpu')
  assert op == conv_ops.ConvOp(conv_ops.CPU_KERNEL, strict=False)
  x, k, b, _ = _inputs((9, 7), 3, 5, (3, 3))
  x16, k16, b16 = (a.astype(jnp.bfloat16) for a in (x, k, b))
  fn = lambda x, k, b: op(x, k, b, (2, 2), 'SAME', 'relu')
  assert 'rsd_conv' not in str(jax.make_jaxpr(fn)(x16, k16, b16))
  got = jax.jit(fn)(x16, k16, b16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      got, conv_ops.reference(x16, k16, b16, (2, 2), 'SAME', 'relu'))


def test_strict_kernel_names_the_shape_and_dtype():
  x, k, _, _ = _inputs((9, 7), 3, 5, (3, 3))
  with pytest.raises(ValueError,
                     match=r"'cpu_kernel' cannot run x \(2, 9, 7, 3\) "
                     r'bfloat16.*config\.model\.conv'):
    KERNEL_OP(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))


def test_bad_values_are_named():
  x, k, _, _ = _inputs((4, 4), 3, 4, (3, 3))
  with pytest.raises(ValueError, match="activation 'gelu'"):
    XLA_OP(x, k, activation='gelu')
  with pytest.raises(ValueError, match="activation 'gelu'"):
    conv_ops.Conv(4, (3, 3), activation='gelu').init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="padding 'FULL'"):
    XLA_OP(x, k, padding='FULL')
  with pytest.raises(ValueError, match='one \\(lo, hi\\) pair per spatial'):
    conv_ops.explicit_padding(((1, 1),), (4, 4), (3, 3), (1, 1))
  with pytest.raises(ValueError, match='NHWC'):
    conv_ops.Conv(3, (3, 3)).init(jax.random.key(0), jnp.zeros((4, 4, 3)))


# --- Choosing -----------------------------------------------------------------


def test_choose_follows_the_name_and_the_backend():
  assert conv_ops.choose('auto', 'gpu').implementation == 'xla'
  assert conv_ops.choose('auto', 'tpu').implementation == 'xla'
  assert conv_ops.choose('xla', 'cpu') == conv_ops.ConvOp('xla')
  with pytest.raises(ValueError, match="'cpu_kernel' cannot run on the tpu "
                     'backend'):
    conv_ops.choose('cpu_kernel', 'tpu')
  with pytest.raises(ValueError, match="config.model.conv='fast'"):
    conv_ops.choose('fast', 'cpu')


def test_choose_without_the_kernels_says_why(monkeypatch, caplog):
  reason = 'no C++ compiler (a test)'
  monkeypatch.setattr(cpu_kernels, 'unavailable_reason', lambda: reason)
  with caplog.at_level(logging.WARNING):
    op = conv_ops.choose('auto', 'cpu')
  assert op.implementation == 'xla'
  assert f'({reason}); using xla' in caplog.text
  with pytest.raises(ValueError, match=r"'cpu_kernel' cannot run: no C\+\+"):
    conv_ops.choose('cpu_kernel', 'cpu')


@pytest.mark.usefixtures('kernels')
def test_choose_on_cpu_takes_the_kernel_when_it_builds():
  assert conv_ops.choose('auto', 'cpu') == conv_ops.ConvOp('cpu_kernel')
  assert conv_ops.choose('cpu_kernel', 'cpu') == KERNEL_OP


# --- One config, 1 or 8 devices -----------------------------------------------


def _meshes():
  return {1: sharding.make_mesh(('data',), (1,), devices=jax.devices()[:1]),
          8: sharding.make_mesh(('data',), (-1,))}


def _tiny_model_config(backbone):
  config = synthetic.get_config('tiny').model
  with config.unlocked():
    config.backbone = backbone
  return config


@pytest.mark.parametrize('platform,conv,attention', [
    ('cpu', None, 'xla'),  # conv: 'cpu_kernel' where it builds, else 'xla'.
    ('tpu', 'xla', 'pallas_tpu'),
    ('gpu', 'xla', 'cudnn'),
])
def test_one_config_same_implementations_on_1_and_8_devices(platform, conv,
                                                            attention):
  if conv is None:
    conv = ('xla' if cpu_kernels.unavailable_reason() else 'cpu_kernel')
  for devices, mesh in _meshes().items():
    convnet = reverse_model.create_model(_tiny_model_config('convnet'),
                                         mesh=mesh, platform=platform)
    assert (convnet.backbone.conv.implementation, devices) == (conv, devices)
    assert convnet.backbone.conv.mesh is mesh
    vit = reverse_model.create_model(_tiny_model_config('vit'), mesh=mesh,
                                     platform=platform)
    assert (vit.backbone.attention.implementation, devices) == (attention,
                                                                devices)


@pytest.mark.usefixtures('kernels')
def test_one_config_same_numbers_on_1_and_8_devices():
  # The tiny ConvNet's embedding and gradients on one device, and with the
  # batch split over 8.
  config = _tiny_model_config('convnet')
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, size=(8, 32, 32, 3)), jnp.uint8)
  params = None
  results = {}
  for devices, mesh in _meshes().items():
    model = reverse_model.create_model(config, mesh=mesh, platform='cpu')
    if params is None:  # The same numbers, as host arrays, for both meshes.
      params = jax.device_get(model.init(jax.random.key(0), images))

    def loss(p, x, model=model):
      return jnp.sum(model.apply(p, x)['embedding'] ** 3)

    step = jax.jit(jax.value_and_grad(loss),
                   in_shardings=(sharding.replicated(mesh),
                                 sharding.batch_sharding(mesh)))
    assert 'rsd_conv_forward' in step.lower(params, images).as_text()
    results[devices] = jax.device_get(step(params, images))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               results[8], results[1])
