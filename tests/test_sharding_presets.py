"""Parameter layout presets: 'fsdp', 'tensor_parallel' and both.

On the tiny ViT and the tiny white-box U-Net, over meshes ('data',) = (8,)
and ('data', 'model') = (2, 4): the named parameters and their AdamW moments
get the expected PartitionSpecs, the bytes per device shrink by the expected
amount, and two train steps match the replicated run. If the specs differ,
check the PARTITION_RULES in reverse_sd/models/{vit,sd_unet}.py; if the
moments differ from their parameters, `sharding.state_layout_shardings`; if the
numbers differ, the layout changed the computation (it never should: only
XLA's collectives change).
"""

import dataclasses
import math

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import diffusiondb_unet
from configs import synthetic
from reverse_sd import optim
from reverse_sd import pretrained
from reverse_sd import sharding
from reverse_sd import state as state_lib
from reverse_sd import train
from reverse_sd.models import reverse_model

BATCH = 16
MESHES = {'data8': (('data',), (8,)), 'data2_model4': (('data', 'model'),
                                                       (2, 4))}
# Params and moments split by FSDP in the tests (the tiny arrays are small).
TEST_FSDP_MIN_SIZE = 256
VIT_QUERY = 'backbone/layers_0/self_attn/q_proj/kernel'
UNET_BLOCK = ('backbone/unet/mid_block/attentions_0/transformer_blocks_0/')


def _config(model_name, context_file, mesh_name, preset, rules=()):
  if model_name == 'vit':
    config = synthetic.get_config('tiny')
  else:
    config = diffusiondb_unet.get_config(f'tiny=1,context={context_file}')
  axes, shape = MESHES[mesh_name]
  with config.unlocked():
    if model_name == 'vit':
      config.model.backbone = 'vit'
    config.mesh.axes = axes
    config.mesh.shape = shape
    config.mesh.param_preset = preset
    config.mesh.param_rules = tuple(rules)
    config.mesh.fsdp_min_size = TEST_FSDP_MIN_SIZE
  return config


def _build(config):
  """(model, tx, schedule, mesh, abstract state, state shardings)."""
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  model = pretrained.create_model(config.model)
  tx, schedule = optim.create_optimizer(
      config.optim, total_steps=10,
      extra_groups=reverse_model.frozen_param_groups(config.model))
  abstract = state_lib.abstract_train_state(model, tx, (32, 32, 3),
                                            jax.random.key(0))
  shardings = state_lib.state_shardings(mesh, abstract,
                                        state_lib.param_layout(config.mesh))
  return model, tx, schedule, mesh, abstract, shardings


def _specs(tree_of_shardings):
  return {sharding.path_str(path): s.spec for path, s in
          jax.tree_util.tree_leaves_with_path(tree_of_shardings)}


def _moment_specs(state_shardings, param_name):
  """Specs of every optimiser-state leaf that belongs to `param_name`."""
  return [spec for name, spec in _specs(state_shardings.opt_state).items()
          if name.endswith('/' + param_name)]


def _expected_bytes(abstract_params, specs, mesh):
  """Per-device bytes computed from the specs, independently of sharding."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    spec = specs[sharding.path_str(path)]
    axes = [a for entry in spec if entry is not None
            for a in ((entry,) if isinstance(entry, str) else entry)]
    split = math.prod(mesh.shape[a] for a in axes)
    total += leaf.size * leaf.dtype.itemsize // split
  return total


def test_vit_tensor_parallel_specs_and_bytes():
  config = _config('vit', None, 'data2_model4', 'tensor_parallel')
  _, _, _, mesh, abstract, shardings = _build(config)
  specs = _specs(shardings.params)
  assert specs[VIT_QUERY] == P(None, 'model')
  assert specs['backbone/layers_1/self_attn/v_proj/bias'] == P('model')
  assert specs['backbone/layers_0/self_attn/out_proj/kernel'] == P(
      'model', None)
  assert specs['backbone/layers_0/self_attn/out_proj/bias'] == P()
  assert specs['backbone/layers_1/fc1/kernel'] == P(None, 'model')
  assert specs['backbone/layers_1/fc2/kernel'] == P('model', None)
  assert specs['backbone/layers_0/layer_norm1/scale'] == P()
  assert specs['head/projection/kernel'] == P()
  moments = _moment_specs(shardings, VIT_QUERY)
  assert len(moments) == 2 and all(m == P(None, 'model') for m in moments)
  assert shardings.step.spec == P()
  per_device = sharding.per_device_bytes(abstract.params, shardings.params)
  total = sum(l.size * 4 for l in jax.tree_util.tree_leaves(abstract.params))
  assert per_device == _expected_bytes(abstract.params, specs, mesh)
  # Each block's q/k/v/out/fc1/fc2 kernels (and 4 biases) lose 3/4.
  block = 4 * 32 * 32 + 2 * 32 * 64 + 3 * 32 + 64
  assert total - per_device == 2 * block * 4 * 3 // 4
  assert 'per device' in sharding.describe(abstract.params, shardings.params)


def test_vit_fsdp_splits_params_and_moments_by_shape():
  config = _config('vit', None, 'data8', 'fsdp')
  _, _, _, mesh, abstract, shardings = _build(config)
  specs = _specs(shardings.params)
  # (32, 32): a tie, the last dimension; (32, 64): the larger one.
  assert specs[VIT_QUERY] == P(None, 'data')
  assert specs['backbone/layers_0/fc1/kernel'] == P(None, 'data')
  assert specs['backbone/layers_0/fc2/kernel'] == P('data', None)
  assert specs['backbone/patch_embedding/kernel'] == P(
      None, None, None, 'data')  # (8, 8, 3, 32) = 6144 elements.
  assert specs['backbone/layers_0/fc1/bias'] == P()  # 64 < min size.
  assert specs['head/projection/kernel'] == P(None, 'data')
  for name in (VIT_QUERY, 'head/projection/kernel'):
    moments = _moment_specs(shardings, name)
    assert moments and all(m == specs[name] for m in moments), name
  per_device = sharding.per_device_bytes(abstract.params, shardings.params)
  assert per_device == _expected_bytes(abstract.params, specs, mesh)
  # With no size limit every array has a dimension 8 divides: 1/8 each.
  layout = state_lib.param_layout(config.mesh)
  everything = sharding.state_layout_shardings(
      mesh, abstract, dataclasses.replace(layout, fsdp_min_size=1))
  total = sum(l.size * 4 for l in jax.tree_util.tree_leaves(abstract.params))
  assert sharding.per_device_bytes(abstract.params,
                                   everything.params) * 8 == total


def test_vit_fsdp_with_tensor_parallel_and_explicit_rules():
  config = _config('vit', None, 'data2_model4', 'fsdp+tensor_parallel',
                   rules=[(r'layers_1/fc1/kernel$', ())])
  _, _, _, _, _, shardings = _build(config)
  specs = _specs(shardings.params)
  assert specs[VIT_QUERY] == P('data', 'model')  # FSDP on the free dim.
  assert specs['backbone/layers_0/fc2/kernel'] == P('model', 'data')
  assert specs['backbone/layers_1/fc1/kernel'] == P()  # The explicit rule.
  assert specs['head/projection/kernel'] == P(None, 'data')
  assert all(m == P('data', 'model')
             for m in _moment_specs(shardings, VIT_QUERY))


def test_unet_specs_follow_the_rules(context_file):
  config = _config('unet', context_file, 'data2_model4', 'tensor_parallel')
  _, _, _, mesh, abstract, shardings = _build(config)
  specs = _specs(shardings.params)
  resnet = 'backbone/unet/down_blocks_1/resnets_0/'
  expected = {
      UNET_BLOCK + 'attn1/to_q/kernel': P(None, 'model'),
      UNET_BLOCK + 'attn2/to_k/kernel': P(None, 'model'),
      UNET_BLOCK + 'attn2/to_out/kernel': P('model', None),
      UNET_BLOCK + 'attn2/to_out/bias': P(),
      UNET_BLOCK + 'ff/geglu_proj/kernel': P(None, 'model'),
      UNET_BLOCK + 'ff/geglu_proj/bias': P('model'),
      UNET_BLOCK + 'ff/out_proj/kernel': P('model', None),
      resnet + 'conv1/kernel': P(None, None, None, 'model'),
      resnet + 'conv1/bias': P('model'),
      resnet + 'time_emb_proj/kernel': P(None, 'model'),
      resnet + 'conv2/kernel': P(None, None, 'model', None),
      resnet + 'conv_shortcut/kernel': P(),
      'backbone/unet/conv_in/kernel': P(),
  }
  for name, spec in expected.items():
    assert specs[name] == spec, name
    moments = _moment_specs(shardings, name)
    assert len(moments) == 2 and all(m == spec for m in moments), name
  per_device = sharding.per_device_bytes(abstract.params, shardings.params)
  assert per_device == _expected_bytes(abstract.params, specs, mesh)
  total = sum(l.size * 4 for l in jax.tree_util.tree_leaves(abstract.params))
  assert per_device < 0.6 * total

  config = _config('unet', context_file, 'data8', 'fsdp')
  _, _, _, mesh, abstract, shardings = _build(config)
  specs = _specs(shardings.params)
  assert specs[UNET_BLOCK + 'ff/geglu_proj/kernel'] == P(None, 'data')
  assert specs[resnet + 'conv2/kernel'] == P(None, None, None, 'data')
  assert specs[UNET_BLOCK + 'norm1/scale'] == P()
  assert sharding.per_device_bytes(abstract.params, shardings.params) == (
      _expected_bytes(abstract.params, specs, mesh))


def _host_params(abstract_params, seed=0):
  """Fan-in scaled random parameters, made on the host.

  For the U-Net: jitting its init costs more compile time than the steps.
  """
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = sharding.path_str(path)
    noise = rng.normal(size=leaf.shape).astype(leaf.dtype)
    if name.endswith('scale'):
      return 1 + 0.01 * noise
    if name.endswith('bias') or len(leaf.shape) < 2:
      return 0.01 * noise
    return noise / np.sqrt(math.prod(leaf.shape[:-1]))

  return jax.tree_util.tree_map_with_path(make, abstract_params)


def _train(config, batches, host_params=None):
  """Params and losses after `len(batches)` train steps, and the state."""
  model, tx, schedule, mesh, abstract, shardings = _build(config)
  if host_params is None:
    state, _ = state_lib.create_train_state(
        model, tx, (32, 32, 3), jax.random.key(0), mesh, shardings=shardings)
  else:
    state = jax.device_put(
        state_lib.TrainState.create(apply_fn=model.apply,
                                    params=host_params(abstract.params),
                                    tx=tx),
        shardings)
  assert _specs(jax.tree.map(lambda x: x.sharding, state)) == _specs(
      shardings)
  step = train.make_train_step(model, config.loss, schedule, mesh, shardings)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.host_to_global(batch, mesh))
    losses.append(float(metrics.compute()['loss']))
  return jax.device_get(state.params), losses, state


def _batches(model_name):
  """Two batches; the U-Net reads cached VAE latents (its frozen stage)."""
  rng = np.random.default_rng(0)

  def inputs():
    if model_name == 'vit':
      return {'image': rng.integers(0, 256, (BATCH, 32, 32, 3),
                                    dtype=np.uint8)}
    return {'features': rng.normal(size=(BATCH, 16, 16, 4)).astype(
        np.float32)}

  return [dict(inputs(), embedding=rng.normal(size=(BATCH, 384)).astype(
      np.float32)) for _ in range(2)]


# Each case compiles a replicated and a sharded step on the same mesh (the
# U-Net's take a minute on a loaded 2-core machine: one case). FSDP on the
# U-Net is the same shape-driven code as on the ViT; its specs are checked in
# test_unet_specs_follow_the_rules.
@pytest.mark.parametrize('model_name,mesh_name,preset', [
    ('vit', 'data8', 'fsdp'),
    ('vit', 'data2_model4', 'tensor_parallel'),
    ('unet', 'data2_model4', 'fsdp+tensor_parallel'),
])
def test_sharded_steps_match_replicated(model_name, mesh_name, preset,
                                        context_file):
  batches = _batches(model_name)
  host_params = None if model_name == 'vit' else _host_params
  params_ref, losses_ref, _ = _train(
      _config(model_name, context_file, mesh_name, ''), batches, host_params)
  params, losses, state = _train(
      _config(model_name, context_file, mesh_name, preset), batches,
      host_params)
  # Some arrays really are split (or the test proves nothing).
  assert any(x.sharding.spec != P()
             for x in jax.tree_util.tree_leaves(state.params))
  np.testing.assert_allclose(losses, losses_ref, rtol=1e-5, atol=1e-6)
  flat = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, expected in jax.tree_util.tree_leaves_with_path(params_ref):
    name = sharding.path_str(path)
    if name.endswith('k_proj/bias'):
      # Softmax ignores a shift shared by all keys: this gradient is zero up
      # to rounding, and Adam's normalisation turns rounding into full steps.
      continue
    np.testing.assert_allclose(flat[path], expected, rtol=1e-5, atol=1e-6,
                               err_msg=name)
  assert int(state.step) == 2


def test_unknown_preset_lists_the_valid_ones():
  config = _config('vit', None, 'data8', 'zero3')
  with pytest.raises(ValueError, match=r"param_preset='zero3'.*'fsdp', "
                     r"'tensor_parallel', 'fsdp\+tensor_parallel'"):
    state_lib.param_layout(config.mesh)


def test_tensor_parallel_needs_a_model_axis():
  for preset in ('tensor_parallel', 'fsdp+tensor_parallel'):
    config = _config('vit', None, 'data8', preset)
    with pytest.raises(ValueError, match=r"'model' mesh axis.*"
                       r"axes=\('data',\) has none"):
      state_lib.param_layout(config.mesh)


def test_fsdp_axis_must_be_a_mesh_axis():
  config = _config('vit', None, 'data8', 'fsdp')
  with config.unlocked():
    config.mesh.fsdp_axis = 'model'
  with pytest.raises(ValueError, match=r"fsdp_axis='model' is not one of"):
    state_lib.param_layout(config.mesh)


def test_rule_that_does_not_divide_names_parameter_shape_and_axis():
  config = _config('vit', None, 'data8', '',
                   rules=[(r'position_embedding$', ('data', None))])
  with pytest.raises(ValueError) as error:
    _build(config)
  message = str(error.value)
  for part in ("'backbone/position_embedding'", '(17, 32)', 'size 8',
               'position_embedding$'):
    assert part in message, message
  # The same check guards plain tree_shardings.
  mesh = sharding.make_mesh(('data', 'model'), (2, 4))
  tree = {'fc': {'kernel': jax.ShapeDtypeStruct((6, 8), np.float32)}}
  with pytest.raises(ValueError, match=r"'fc/kernel' \(shape \(6, 8\)\).*"
                     r'size 4'):
    sharding.tree_shardings(mesh, tree, [(r'kernel$', ('model', None))])
  with pytest.raises(ValueError, match=r"no axis 'expert'"):
    sharding.tree_shardings(mesh, tree, [(r'kernel$', (None, 'expert'))])


def test_malformed_param_rules_are_named():
  config = _config('vit', None, 'data8', '', rules=[('fc1/kernel$', 'model')])
  with pytest.raises(ValueError, match=r'param_rules\[0\]'):
    state_lib.param_layout(config.mesh)
